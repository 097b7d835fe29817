"""MineBatches through the client: P x K batches of neighbouring classes, passes, shards."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

import likeness


def cosine_distances(a, b):
    """(len(a), len(b)) cosine distances, in float64."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1.0 - a @ b.T


def test_batches_hold_k_items_of_p_classes_with_the_nearest_classes_next(client, classes40):
    coll, ids, vectors, labels = classes40
    by_id = dict(zip(ids, labels))
    stored = dict(zip(ids, vectors))
    members = defaultdict(list)
    for i, label in zip(ids, labels):
        members[label].append(stored[i])
    stream = client.mine_batches(
        coll, classes=4, per_class=4, neighbours=2, seed=3, with_vectors=True
    )
    batches = list(stream)
    agree = 0
    for n, b in enumerate(batches):
        assert b.batch == n and b.pass_ == 0
        assert len(b.classes) == len(set(b.classes)) == 4 and b.neighbours == 2
        # K distinct items of each class (every class has 8), class by class, anchor first.
        assert len(b) == 16 and len(set(b.ids)) == 16
        assert b.labels == [c for c in b.classes for _ in range(4)]
        assert [by_id[i] for i in b.ids] == b.labels
        assert all(b.items[i].label == by_id[i] for i in b.ids)
        np.testing.assert_array_equal(b.vectors(b.ids), np.stack([stored[i] for i in b.ids]))
        # 0 for the anchor class, then the two neighbours nearest first, NaN for the random one.
        d = b.class_distances
        assert d.shape == (4,) and d[0] == 0.0
        assert np.isfinite(d[1:3]).all() and d[1] <= d[2] and np.isnan(d[3])
        # The neighbours are the classes nearest to the anchor class's items in the batch:
        # per anchor item, its nearest item of the class among its 32 nearest negatives
        # (the 32nd's distance when none is), averaged over the anchor items.
        anchors = b.vectors(b.ids[:4])
        negatives = [(c, m) for c, m in members.items() if c != b.classes[0]]
        names = [c for c, m in negatives for _ in m]
        dist = cosine_distances(anchors, np.stack([v for _, m in negatives for v in m]))
        exact = defaultdict(float)
        for row in dist:
            order = np.argsort(row)[:32]
            horizon = row[order[-1]]
            nearest = {}
            for j in order:
                nearest.setdefault(names[j], row[j])
            for c, _ in negatives:
                exact[c] += nearest.get(c, horizon) / len(anchors)
        # HNSW is approximate (a graph built by two threads can miss an item now and
        # then), so a batch or two may differ from the brute-force answer.
        agree += b.classes[1:3] == sorted(exact, key=exact.get)[:2] and d[1:3] == pytest.approx(
            [exact[c] for c in b.classes[1:3]], abs=1e-4
        )
    assert agree >= 0.9 * len(batches), f"{agree} of {len(batches)} batches as brute force ranks"
    # One pass: every item at least once. Each batch hands out 4 of the 80 class-halves,
    # at least one of them (the anchor class's) still due this pass.
    assert set().union(*(b.ids for b in batches)) == set(ids)
    assert 20 <= len(batches) <= 80
    s = stream.stats
    assert s is not None and s.batches == len(batches)
    assert s.neighbour_classes == 2 * len(batches) and s.random_classes == len(batches)


def test_shards_of_a_pass_are_disjoint_and_cover_every_item(client, classes40):
    coll, ids, _, labels = classes40
    by_id = dict(zip(ids, labels))
    seen = []
    for index in range(2):
        items = set()
        for b in client.mine_batches(coll, shard=(index, 2), seed=1):
            # K items or all the class has in the shard (about 4 of its 8).
            assert len(b.classes) == 8 and len(b) <= 32
            assert [by_id[i] for i in b.ids] == b.labels
            assert set(b.labels) == set(b.classes)
            items.update(b.ids)
        # The client's hash agrees with the daemon's.
        assert all(likeness.shard_of(i, 2) == index for i in items)
        seen.append(items)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ids)


def test_max_batches_goes_on_into_later_passes(client, classes40):
    coll, ids, _, _ = classes40
    # A pass of 8 x 4 over 320 items takes 80 batches at most (one due class-half each).
    stream = client.mine_batches(coll, classes=8, per_class=4, seed=2, max_batches=81)
    batches = list(stream)
    assert [b.batch for b in batches] == list(range(81))
    passes = [b.pass_ for b in batches]
    assert passes == sorted(passes) and passes[0] == 0 and passes[-1] >= 1
    by_pass = defaultdict(set)
    for b in batches:
        by_pass[b.pass_].update(b.ids)
    for p in range(passes[-1]):  # every finished pass covered every item
        assert by_pass[p] == set(ids)
    assert stream.stats.batches == 81
    # No vectors or inputs unless asked.
    assert all(m.vector is None and m.input is None for b in batches for m in b.items.values())


def test_the_seed_fixes_the_stream(client, classes40):
    coll = classes40[0]

    def draw(seed):
        return [b.ids for b in client.mine_batches(coll, seed=seed, max_batches=5)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_a_batch_stream_can_stop_early(client, classes40):
    coll = classes40[0]
    with client.mine_batches(coll, classes=2, per_class=2) as stream:
        first = next(iter(stream))
        assert len(first) == 4 and first.neighbours == 1
    assert stream.stats is None
    assert client.get_collection(coll).count == len(classes40[1])


def test_bad_batch_requests_raise_with_the_field(client, classes40):
    coll = classes40[0]
    with pytest.raises(likeness.NotFound):
        list(client.mine_batches("no-such-collection"))
    with pytest.raises(likeness.InvalidArgument, match="neighbours"):
        list(client.mine_batches(coll, classes=4, neighbours=4))
    with pytest.raises(likeness.InvalidArgument, match="classes"):
        list(client.mine_batches(coll, classes=1))
    with pytest.raises(likeness.InvalidArgument, match="shard"):
        list(client.mine_batches(coll, shard=(2, 2)))
