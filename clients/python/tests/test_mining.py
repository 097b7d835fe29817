"""Mining through the client: triplets, pairs, shards, Sessions and their errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import likeness
from conftest import clustered
from likeness.v1 import likeness_pb2 as pb


def cosine_distance(a, b):
    return 1.0 - float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b))


def test_fnv1a_matches_the_reference_values():
    # Published FNV-1a 64 test vectors.
    assert likeness.fnv1a(b"") == 0xCBF29CE484222325
    assert likeness.fnv1a(b"a") == 0xAF63DC4C8601EC8C
    assert likeness.fnv1a(b"foobar") == 0x85944171F73967E8


def test_mine_triplets_positives_share_labels(client, labelled):
    coll, ids, vectors, labels = labelled
    by_id = dict(zip(ids, labels))
    stream = client.mine_triplets(
        coll,
        "semi-hard",
        margin=0.2,
        negatives_per_anchor=2,
        batch_size=64,
        seed=3,
        with_vectors=True,
    )
    anchors, rows, triplets = [], 0, 0
    for batch in stream:
        assert (
            len(batch.anchor_ids)
            == len(batch.negative_ids)
            == batch.d_an.shape[0]
            == batch.fallback.shape[0]
        )
        for a, p, n, dap, dan in zip(
            batch.anchor_ids, batch.positive_ids, batch.negative_ids, batch.d_ap, batch.d_an
        ):
            assert by_id[a] == by_id[p] and a != p
            assert by_id[n] != by_id[a]
            # The reported distances are the collection's, on the stored vectors.
            va, vp, vn = batch.vectors([a, p, n])
            assert dap == pytest.approx(cosine_distance(va, vp), abs=1e-4)
            assert dan == pytest.approx(cosine_distance(va, vn), abs=1e-4)
            assert batch.items[n].label == by_id[n]
        anchors.extend(batch.raw.triplets[i].anchor_id for i in range(len(batch.raw.triplets)))
        rows += len(batch)
        triplets += len(batch.raw.triplets)
        assert len(batch) == sum(len(t.negative_ids) for t in batch.raw.triplets)
        assert batch.vectors(batch.anchor_ids).shape == (len(batch), 16)
    assert sorted(anchors) == sorted(ids), "one pass: every labelled item is an anchor once"
    assert stream.stats is not None and stream.stats.anchors == len(ids)
    # One row per (anchor, positive, negative); SEMI_HARD may find fewer than asked.
    assert stream.stats.triplets == triplets and triplets <= rows <= 2 * triplets


def test_mine_pairs_same_means_same_label(client, labelled):
    coll, ids, _, labels = labelled
    by_id = dict(zip(ids, labels))
    stream = client.mine_pairs(
        coll, "hard", negatives_per_anchor=2, batch_size=100, max_triplets=150
    )
    pairs = 0
    for batch in stream:
        for a, b, same, d in zip(batch.a_ids, batch.b_ids, batch.same, batch.distances):
            assert bool(same) == (by_id[a] == by_id[b])
            assert d >= 0
        pairs += len(batch)
        assert batch.items == {}, "no items unless asked"
    assert 0 < pairs and stream.stats.pairs == pairs


def test_shards_are_disjoint_and_cover_every_anchor(client, labelled):
    coll, ids, _, _ = labelled
    seen = []
    for index in range(2):
        anchors = set()
        for batch in client.mine_triplets(coll, "random", shard=(index, 2), batch_size=32):
            anchors.update(batch.anchor_ids)
        # The client's hash agrees with the daemon's.
        assert all(likeness.shard_of(a, 2) == index for a in anchors)
        seen.append(anchors)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ids)


def test_a_stream_can_stop_early(client, labelled):
    coll = labelled[0]
    with client.mine_triplets(coll, "hard", batch_size=4) as stream:
        first = next(iter(stream))
        assert len(first) > 0
    # The daemon keeps serving after a cancelled stream.
    assert client.get_collection(coll).count == len(labelled[1])


def test_bad_mining_requests_raise_with_the_field(client, labelled):
    coll = labelled[0]
    with pytest.raises(likeness.NotFound):
        list(client.mine_triplets("no-such-collection", "hard"))
    with pytest.raises(likeness.InvalidArgument, match="shard"):
        list(client.mine_triplets(coll, "hard", shard=(2, 2)))
    with pytest.raises(likeness.InvalidArgument, match=r"anchors\.ids\[1\]"):
        list(client.mine_pairs(coll, "hard", anchors=[labelled[1][0], "nope"]))
    with pytest.raises(likeness.InvalidArgument, match="strategy"):
        list(client.mine_triplets(coll, 0))
    with pytest.raises(ValueError, match="unknown strategy"):
        client.mine_triplets(coll, "hardest")
    with pytest.raises(TypeError, match="unknown mining option"):
        client.mine_triplets(coll, "hard", negatives=3)


def test_session_steps_with_fresh_vectors(client, labelled):
    coll, ids, vectors, labels = labelled
    by_id = dict(zip(ids, labels))
    rng = np.random.default_rng(7)
    with client.session(coll, "hard", negatives_per_anchor=1, with_vectors=True) as s:
        for step in range(3):
            pick = rng.choice(len(ids), size=12, replace=False)
            step_ids = [ids[i] for i in pick]
            fresh = vectors[pick] + 0.01 * rng.normal(size=(12, 16)).astype(np.float32)
            b = s.step(step_ids, fresh)
            assert b.step == step and b.stats.anchors == 12
            assert set(b.anchor_ids) <= set(step_ids)
            for a, p, n, dap in zip(b.anchor_ids, b.positive_ids, b.negative_ids, b.d_ap):
                assert by_id[a] == by_id[p] and by_id[a] != by_id[n]
                # Distances are measured from the vectors the step sent.
                va = fresh[step_ids.index(a)]
                assert dap == pytest.approx(cosine_distance(va, b.items[p].vector), abs=1e-4)
        # A new anchor with a label and a vector; new options from the next step on.
        s.update(strategy="random", negatives_per_anchor=3)
        b = s.step(["brand-new"], vectors[:1], labels=["class-0"], step=10)
        assert b.step == 10 and set(b.anchor_ids) == {"brand-new"}
        assert len(b) == 3 and all(by_id[n] != "class-0" for n in b.negative_ids)


def test_session_errors_name_the_step(client, labelled):
    coll, ids, _, _ = labelled
    s = client.session(coll, "hard")
    s.step(ids[:2])
    with pytest.raises(likeness.InvalidArgument, match=r"steps\[1\]\.anchors\[0\]\.vector"):
        s.step(ids[:1], np.ones((1, 3)))
    with pytest.raises(RuntimeError, match="closed"):
        s.step(ids[:1])
    s.close()
    with pytest.raises(ValueError, match=r"\(2, d\)"):
        client.session(coll, "hard").step(ids[:2], np.ones((3, 16)))


def test_session_write_back_is_a_cross_batch_memory(client, name):
    ids, vectors, labels = clustered(10, 6, 16, seed=8)
    client.create_collection(name, 16, "cosine", keep_inputs=True)
    raw = [np.full((2, 3), n, dtype=np.float32) for n in range(len(ids))]
    client.upsert(
        name, ids, vectors, labels=labels, metadata=[{"n": i} for i in ids], inputs=raw
    )
    by_id, stored = dict(zip(ids, labels)), dict(zip(ids, vectors))
    rng = np.random.default_rng(9)
    pick = rng.choice(len(ids), size=12, replace=False)
    step_ids = [ids[i] for i in pick] + ["brand-new"]
    fresh = rng.normal(size=(13, 16)).astype(np.float32)
    names = [""] * 12 + ["class-3"]  # "" keeps the stored label; a new item needs one
    with client.session(name, "hard", negatives_per_anchor=2, with_vectors=True) as s:
        b = s.step(step_ids, fresh, labels=names, step=5, write_back=True)
        assert b.step == 5 and len(b) > 0
        # Mined before the write-back: the items are the stored vectors and labels.
        for i in set(b.positive_ids) | set(b.negative_ids):
            assert b.items[i].label == by_id[i] and b.items[i].generation == 0
            np.testing.assert_array_equal(b.items[i].vector, stored[i])
        # The next step is mined after it: the anchors' stored vectors are the fresh ones.
        b = s.step(step_ids[:12], step=6)
        assert b.written_step == 5 and s.written_step == 5
        assert b.stats.written == 13
        assert b.anchor_ids
        for a in set(b.anchor_ids):
            np.testing.assert_array_equal(b.items[a].vector, fresh[step_ids.index(a)])
            assert b.items[a].generation == 5
    got = client.get(name, step_ids, with_vectors=True, with_inputs=True)
    assert got.ids == step_ids
    np.testing.assert_array_equal(got.vectors, fresh)
    assert got.generations.tolist() == [5] * 13
    assert got.labels == [by_id[i] for i in step_ids[:12]] + ["class-3"]
    assert got.metadata == [{"n": i} for i in step_ids[:12]] + [{}], "metadata is kept"
    for n, inp in zip(pick, got.inputs[:12]):  # and so are the stored inputs
        assert list(inp.tensor.shape) == [2, 3] and set(inp.tensor.values) == {float(n)}
    # The items the steps did not send are as they were.
    rest = [i for i in ids if i not in step_ids]
    untouched = client.get(name, rest, with_vectors=True)
    np.testing.assert_array_equal(untouched.vectors, np.stack([stored[i] for i in rest]))
    assert untouched.generations.tolist() == [0] * len(rest)


def test_session_options_take_sample(client, labelled):
    coll, ids, _, _ = labelled
    req = likeness.mining.mine_request(coll, "semi_hard", sample=16)
    assert req.sample == 16
    with client.session(coll, "semi_hard", sample=8, negatives_per_anchor=1) as s:
        b = s.step(ids[:8])
        assert b.written_step is None and s.written_step is None, "no write-back asked"
        assert sum(b.stats.sources.values()) == len(b) > 0
        assert set(b.stats.sources) <= {"knn", "sample", "second_search"}


def test_mine_options_carry_every_request_field():
    names = {f.name for f in dataclasses.fields(likeness.MineOptions)}
    proto = set(pb.MineRequest.DESCRIPTOR.fields_by_name) - {"collection", "strategy"}
    assert names == proto | {"anchor_labels"}, "MineOptions has MineRequest's fields"
    names = {f.name for f in dataclasses.fields(likeness.BatchOptions)}
    assert names == set(pb.BatchRequest.DESCRIPTOR.fields_by_name) - {"collection"}

    given = dict(
        margin=0.5, negatives_per_anchor=2, positives_per_anchor=3, batch_size=64,
        max_triplets=100, seed=7, candidates=32, sample=16, skip_nearest=1,
        min_distance=0.125, max_distance=1.5, pos_margin=0.25, neg_margin=0.75,
        exclude_ids=["x"], min_generation=4, anchors=["a", "b"], shard=(1, 3),
        with_vectors=True, with_inputs=True, expansion=50,
    )  # fmt: skip
    req = likeness.MineOptions(**given).request("c", "hard")
    assert (req.collection, req.strategy) == ("c", pb.HARD)
    assert list(req.anchors.ids.ids) == ["a", "b"] and list(req.exclude_ids) == ["x"]
    assert (req.shard.index, req.shard.count) == (1, 3)
    for key, value in given.items():
        if key not in ("anchors", "exclude_ids", "shard"):
            assert getattr(req, key) == value, key
    req = likeness.MineOptions(anchor_labels=["k"]).request("c", "random")
    assert list(req.anchors.labels.labels) == ["k"] and not req.HasField("margin")
    assert req.batch_size == 256, "the default the daemon once required"
    with pytest.raises(ValueError, match="not both"):
        likeness.MineOptions(anchors=["a"], anchor_labels=["k"]).request("c", "hard")

    given = dict(
        classes=5, per_class=3, neighbours=2, seed=9, shard=(0, 2), min_generation=1,
        max_batches=4, with_vectors=True, with_inputs=True, expansion=20, candidates=8,
    )  # fmt: skip
    req = likeness.BatchOptions(**given).request("c")
    for key, value in given.items():
        if key != "shard":
            assert getattr(req, key) == value, key
    assert (req.shard.index, req.shard.count) == (0, 2)
    assert not likeness.BatchOptions().request("c").HasField("neighbours"), "None: P - 1"


def test_mine_options_and_keywords_are_one(client, labelled, classes40):
    coll, ids, _, _ = labelled
    opts = likeness.MineOptions(negatives_per_anchor=2, batch_size=32, seed=3)

    def rows(stream):
        return [(b.anchor_ids, b.negative_ids) for b in stream]

    by_object = rows(client.mine_triplets(coll, "hard", opts))
    assert by_object and by_object == rows(
        client.mine_triplets(coll, "hard", negatives_per_anchor=2, batch_size=32, seed=3)
    )
    # Keywords over an options object.
    few = rows(client.mine_triplets(coll, "hard", opts, anchors=ids[:5]))
    assert {a for anchors, _ in few for a in anchors} == set(ids[:5])
    assert likeness.mining.mine_request(coll, "hard", opts, seed=5).seed == 5
    assert opts.seed == 3, "the options object is left as it was"

    for call, name in (
        (lambda: client.mine_triplets(coll, "hard", negatives=3), "negatives"),
        (lambda: client.mine_pairs(coll, "hard", opts, marign=0.1), "marign"),
        (lambda: client.session(coll, "hard", with_vector=True), "with_vector"),
        (lambda: client.mine_batches(coll, per_klass=2), "per_klass"),
    ):
        with pytest.raises(TypeError, match=f"unknown .*option '{name}'"):
            call()
    with pytest.raises(TypeError, match="MineOptions"):
        client.mine_triplets(coll, "hard", likeness.BatchOptions())
    with client.session(coll, "hard", opts) as s:
        with pytest.raises(TypeError, match="'typo'"):
            s.update(typo=1)
        s.update(likeness.MineOptions(negatives_per_anchor=3), strategy="random")
        assert len(s.step(ids[:2])) == 6

    two = likeness.BatchOptions(classes=4, per_class=2, max_batches=2)
    batches = list(client.mine_batches(classes40[0], two))
    assert len(batches) == 2 and all(len(b.classes) == 4 for b in batches)
