"""likeness.torch: datasets over mining streams and a Session feed, with real losses.

Skipped when torch is not installed (the `likeness[torch]` extra).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import likeness  # noqa: E402
from conftest import clustered  # noqa: E402
from likeness.torch import (  # noqa: E402
    CollectionMemory,
    MinedPairDataset,
    MinedTripletDataset,
    NeighbourClassBatches,
    SessionFeed,
    current_shard,
)


def loader(dataset, workers):
    # spawn: gRPC does not survive fork() in a process that already has a channel open.
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        multiprocessing_context="spawn" if workers else None,
    )


def anchors_of(batches):
    out = Counter()
    for b in batches:
        a = b.indices_tuple[0]
        out.update(b.ids[i] for i in a.tolist())
    return out


def test_workers_mine_disjoint_shards_that_cover_every_anchor(daemon, labelled):
    coll, ids, _, _ = labelled
    ds = MinedTripletDataset(daemon.address, coll, "hard", batch_size=16, seed=1)
    seen = anchors_of(loader(ds, 2))
    # Each anchor once: the two workers did not both mine it, and none was missed.
    assert set(seen) == set(ids) and max(seen.values()) == 1


def test_ranks_times_workers_split_the_anchors(daemon, labelled):
    coll, ids, _, _ = labelled
    per_rank = []
    for rank in range(2):
        ds = MinedTripletDataset(
            daemon.address, coll, "random", batch_size=16, rank=rank, world_size=2
        )
        per_rank.append(anchors_of(loader(ds, 2)))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(ids)
    assert max((per_rank[0] + per_rank[1]).values()) == 1
    assert current_shard(rank=1, world_size=2) == (1, 2)  # outside a worker
    with pytest.raises(ValueError, match="rank 2"):
        current_shard(rank=2, world_size=2)


def test_triplet_tensors_are_ready_for_a_loss(daemon, labelled):
    coll, _, vectors, _ = labelled
    ds = MinedTripletDataset(
        daemon.address, coll, "semi_hard", negatives_per_anchor=2, batch_size=32, seed=2
    )
    model = torch.nn.Linear(16, 8)
    batches = list(loader(ds, 0))
    assert batches
    for b in batches:
        u = len(b.ids)
        assert b.data.shape == (u, 16) and b.data.dtype == torch.float32
        assert b.labels.shape == (u,) and b.labels.dtype == torch.int64
        a, p, n = b.indices_tuple
        assert (
            a.shape == p.shape == n.shape == (len(b),) and int(max(a.max(), p.max(), n.max())) < u
        )
        assert torch.equal(b.labels[a], b.labels[p]) and not (b.labels[a] == b.labels[n]).any()
        assert [b.label_names[c] for c in b.labels.tolist()] == [
            f"class-{i.split('-')[1]}" for i in b.ids
        ]
        assert b.anchors.shape == b.negatives.shape == (len(b), 16)
        # The distances the daemon reported hold for the vectors it sent.
        cos = F.cosine_similarity(b.anchors, b.negatives)
        assert torch.allclose(1 - cos, b.d_an, atol=1e-4)
    b = batches[0]
    e = model(b.data)
    loss = F.triplet_margin_loss(
        e[b.indices_tuple[0]], e[b.indices_tuple[1]], e[b.indices_tuple[2]]
    )
    loss.backward()
    assert torch.isfinite(loss) and model.weight.grad is not None
    assert torch.isfinite(torch.nn.TripletMarginLoss()(b.anchors, b.positives, b.negatives))


def test_pytorch_metric_learning_takes_the_batches(daemon, labelled):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    coll = labelled[0]
    b = next(iter(loader(MinedTripletDataset(daemon.address, coll, "hard", batch_size=32), 0)))
    model = torch.nn.Linear(16, 8)
    loss = losses.TripletMarginLoss(margin=0.2)(model(b.data), b.labels, b.indices_tuple)
    loss.backward()
    assert torch.isfinite(loss) and model.weight.grad is not None

    p = next(iter(loader(MinedPairDataset(daemon.address, coll, "hard", batch_size=32), 0)))
    loss = losses.ContrastiveLoss()(model(p.data), p.labels, p.indices_tuple)
    assert torch.isfinite(loss)


def test_pair_dataset(daemon, labelled):
    coll, ids, _, _ = labelled
    ds = MinedPairDataset(daemon.address, coll, "hard", negatives_per_anchor=2, batch_size=40)
    total, anchors = 0, Counter()
    for b in loader(ds, 2):
        assert b.pairs.shape == (len(b), 2) and b.same.dtype == torch.bool
        assert torch.equal(b.labels[b.pairs[:, 0]] == b.labels[b.pairs[:, 1]], b.same)
        a1, p, a2, n = b.indices_tuple
        assert len(a1) + len(a2) == len(b) and b.a.shape == (len(b), 16)
        loss = F.cosine_embedding_loss(b.a, b.b, b.same.float() * 2 - 1)
        assert torch.isfinite(loss)
        total += len(b)
        anchors.update(b.ids[i] for i in b.pairs[:, 0].tolist())
    assert total > 0 and set(anchors) == set(ids)


def test_epochs_draw_afresh(daemon, labelled):
    coll = labelled[0]
    ds = MinedTripletDataset(daemon.address, coll, "random", batch_size=64, seed=5)
    first = [b.ids for b in loader(ds, 0)]
    again = [b.ids for b in loader(ds, 0)]
    ds.set_epoch(1)
    other = [b.ids for b in loader(ds, 0)]
    assert first == again and first != other


def test_inputs_dataset_decodes_images(client, daemon, name):
    pytest.importorskip("PIL")
    from PIL import Image

    client.create_collection(name, model="fmnist-triplet")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8), mode="L") for _ in range(12)
    ]
    client.upsert(
        name, [f"im{i}" for i in range(12)], inputs=images, labels=[f"l{i % 3}" for i in range(12)]
    )
    b = next(iter(loader(MinedTripletDataset(daemon.address, name, "hard", data="inputs"), 0)))
    assert b.data.shape == (len(b.ids), 1, 28, 28)
    for row, item_id in enumerate(b.ids):
        pixels = np.asarray(images[int(item_id[2:])], dtype=np.float32) / 255.0
        np.testing.assert_allclose(b.data[row, 0].numpy(), pixels, atol=1e-6)


def test_session_feed_trains_against_the_collection(client, labelled):
    coll, ids, vectors, labels = labelled
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rng = np.random.default_rng(3)
    with SessionFeed(client, coll, "hard", negatives_per_anchor=2) as feed:
        for step in range(3):
            pick = rng.choice(len(ids), size=16, replace=False)
            step_ids = [ids[i] for i in pick]
            emb = model(torch.from_numpy(vectors[pick]))
            b = feed.step(step_ids, emb)
            assert b.step == step and len(b) > 0
            assert b.memory.shape == (len(b.memory_ids), 16)
            assert b.labels.shape == (16,) and (b.labels >= 0).all()
            # Anchor labels and memory labels share one code table.
            assert torch.equal(b.labels[b.anchor_index], b.memory_labels[b.positive_index])
            assert not (b.labels[b.anchor_index] == b.memory_labels[b.negative_index]).any()
            loss = F.triplet_margin_loss(emb[b.anchor_index], b.positives, b.negatives)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert model.weight.grad is not None
            # The trainer writes its fresh embeddings back for the next step.
            client.upsert(
                coll,
                step_ids,
                emb.detach().numpy(),
                labels=[labels[i] for i in pick],
                generation=step + 1,
            )
    client.upsert(coll, ids, vectors, labels=labels)  # restore the shared collection


def test_neighbour_class_batches_split_a_pass_between_ranks(daemon, classes40):
    coll, ids, vectors, labels = classes40
    by_id, stored = dict(zip(ids, labels)), dict(zip(ids, vectors))
    per_rank = []
    for rank in range(2):
        ds = NeighbourClassBatches(
            daemon.address, coll, classes=8, per_class=4, data="vectors", rank=rank, world_size=2
        )
        seen = set()
        for b in loader(ds, 2):
            assert b.pass_ == 0 and len(b.classes) == 8 and 0 < len(b) <= 32
            # Codes per batch follow the batch's classes: the anchor class is 0.
            assert b.label_names == b.classes and b.labels[0] == 0
            assert [b.classes[c] for c in b.labels.tolist()] == [by_id[i] for i in b.ids]
            assert b.data.shape == (len(b), 16) and b.data.dtype == torch.float32
            assert torch.equal(b.data, torch.from_numpy(np.stack([stored[i] for i in b.ids])))
            # Worker w of rank r mines shard 2r + w of 4.
            assert all(likeness.shard_of(i, 4) in (2 * rank, 2 * rank + 1) for i in b.ids)
            seen.update(b.ids)
        per_rank.append(seen)
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(ids)


def test_neighbour_class_batches_epochs_and_ids_only(daemon, classes40):
    coll, ids, _, labels = classes40
    table = {name: n for n, name in enumerate(sorted(set(labels)))}
    by_id = dict(zip(ids, labels))
    ds = NeighbourClassBatches(daemon.address, coll, label_ids=table, seed=4, max_batches=6)
    first = list(loader(ds, 0))
    assert len(first) == 6 and all(b.data is None for b in first)
    for b in first:
        assert b.labels.tolist() == [table[by_id[i]] for i in b.ids]
    assert [b.ids for b in loader(ds, 0)] == [b.ids for b in first]
    ds.set_epoch(1)
    assert [b.ids for b in loader(ds, 0)] != [b.ids for b in first]
    with pytest.raises(TypeError, match="strategy"):
        NeighbourClassBatches(daemon.address, coll, strategy="hard")
    with pytest.raises(TypeError, match="shard"):
        NeighbourClassBatches(daemon.address, coll, shard=(0, 2))
    with pytest.raises(ValueError, match="data"):
        NeighbourClassBatches(daemon.address, coll, data="pixels")


def test_neighbour_class_batches_feed_an_in_batch_miner(daemon, classes40):
    pml = pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners

    ds = NeighbourClassBatches(daemon.address, classes40[0], data="vectors", max_batches=2)
    model = torch.nn.Linear(16, 8)
    for b in loader(ds, 0):
        emb = model(b.data)
        pairs = miners.MultiSimilarityMiner()(emb, b.labels)
        loss = losses.MultiSimilarityLoss()(emb, b.labels, pairs)
        loss.backward()
        assert torch.isfinite(loss) and model.weight.grad is not None
    assert pml is not None


def memory_collection(client, name, classes=10, per_class=8):
    ids, vectors, labels = clustered(classes, per_class, 16, seed=11)
    client.create_collection(name, 16, "cosine")
    client.upsert(name, ids, vectors, labels=labels)
    return ids, vectors, labels


def test_collection_memory_refs_are_the_stored_vectors_and_the_batch_is_written_back(
    client, name
):
    ids, vectors, labels = memory_collection(client, name)
    by_id, stored = dict(zip(ids, labels)), dict(zip(ids, vectors))
    model = torch.nn.Linear(16, 16)
    # Two disjoint batches of 20: 2 items of each class, then 2 more.
    batches = [[i for i in ids if int(i.split("-")[2]) in (2 * s, 2 * s + 1)] for s in (0, 1)]
    with CollectionMemory(client, name, negatives_per_anchor=3) as mem:
        sent = []
        for step, batch_ids in zip((3, 4), batches):
            x = torch.from_numpy(np.stack([stored[i] for i in batch_ids]))
            emb = model(x)
            names = [by_id[i] for i in batch_ids]
            r = mem.step(batch_ids, emb, names, step)
            assert r.step == step and not r.warming_up and len(r) > 0
            assert r.ref_emb.shape == (len(r.ref_ids), 16) and r.ref_emb.dtype == torch.float32
            assert not r.ref_emb.requires_grad and emb.requires_grad
            assert len(set(r.ref_ids)) == len(r.ref_ids)
            # The refs are the collection's items as stored when the step was mined (the
            # first step's write-back is in by the second), labels coded like the batch's.
            for row, i in enumerate(r.ref_ids):
                assert r.label_names[r.ref_labels[row]] == by_id[i]
                assert torch.equal(r.ref_emb[row], torch.from_numpy(stored[i]))
            assert [r.label_names[c] for c in r.labels.tolist()] == names
            a, p, n = r.indices_tuple
            assert len(a) > 0 and torch.equal(r.labels[a], r.ref_labels[p])
            assert not (r.labels[a] == r.ref_labels[n]).any()
            fresh = emb.detach().numpy()
            stored.update(zip(batch_ids, fresh))
            sent.append(fresh)
        assert r.written_step == 3 and mem.written_step == 3
    # Closed: the last step's write-back is durable too.
    for step, batch_ids, fresh in zip((3, 4), batches, sent):
        got = client.get(name, batch_ids, with_vectors=True)
        np.testing.assert_array_equal(got.vectors, fresh)
        assert got.generations.tolist() == [step] * len(batch_ids)
        assert got.labels == [by_id[i] for i in batch_ids]
    assert len(mem.latencies) == 2 and all(t > 0 for t in mem.latencies)


def test_collection_memory_warms_up_then_feeds_a_pml_loss(client, name):
    ids, vectors, labels = memory_collection(client, name)
    by_id, stored = dict(zip(ids, labels)), dict(zip(ids, vectors))
    model = torch.nn.Linear(16, 16)
    batches = [[i for i in ids if int(i.split("-")[2]) in (2 * s, 2 * s + 1)] for s in range(3)]
    mem = CollectionMemory(client, name, warmup=2, negatives_per_anchor=2)
    refs, sent = [], []
    for batch_ids in batches:  # steps 0, 1, 2
        emb = model(torch.from_numpy(np.stack([stored[i] for i in batch_ids])))
        refs.append(mem.step(batch_ids, emb, [by_id[i] for i in batch_ids]))
        sent.append(emb.detach().numpy())
    for r in refs[:2]:
        assert r.warming_up and len(r) == 0
        assert r.ref_emb.shape == (0, 16) and r.ref_labels.shape == (0,)
        assert all(len(t) == 0 for t in r.indices_tuple) and r.labels.shape == (20,)
    r = refs[2]
    assert r.step == 2 and not r.warming_up and len(r) > 0 and r.written_step == 1
    # The warm-up steps still wrote back: their vectors are the memory's now.
    for step in (0, 1):
        got = client.get(name, batches[step], with_vectors=True)
        np.testing.assert_array_equal(got.vectors, sent[step])
        assert got.generations.tolist() == [step] * 20
        stored.update(zip(batches[step], sent[step]))
    for row, i in enumerate(r.ref_ids):
        assert torch.equal(r.ref_emb[row], torch.from_numpy(stored[i]))
    summary = mem.latency_summary()
    assert summary["steps"] == 3
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert summary["max_ms"] == pytest.approx(1000 * max(mem.latencies))
    mem.close()

    losses = pytest.importorskip("pytorch_metric_learning.losses")
    emb = model(torch.from_numpy(np.stack([vectors[ids.index(i)] for i in batches[2]])))
    loss = losses.ContrastiveLoss()(emb, r.labels, ref_emb=r.ref_emb, ref_labels=r.ref_labels)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and model.weight.grad is not None
    # The daemon's own triplets, anchors in the batch and the rest in the memory.
    loss = losses.TripletMarginLoss(margin=0.2)(
        emb, r.labels, r.indices_tuple, ref_emb=r.ref_emb, ref_labels=r.ref_labels
    )
    assert torch.isfinite(loss)


def test_datasets_take_options_objects(daemon, client, labelled, classes40):
    coll, ids, _, _ = labelled
    opts = likeness.MineOptions(negatives_per_anchor=2, batch_size=32, seed=2)
    by_object = MinedTripletDataset(daemon.address, coll, "hard", options=opts)
    by_name = MinedTripletDataset(daemon.address, coll, "hard", negatives_per_anchor=2,
                                  batch_size=32, seed=2)  # fmt: skip
    a, b = list(loader(by_object, 0)), list(loader(by_name, 0))
    assert [x.ids for x in a] == [x.ids for x in b] and a
    assert set(anchors_of(a)) == set(ids)
    with pytest.raises(TypeError, match="'negatives'"):
        MinedPairDataset(daemon.address, coll, "hard", negatives=2)

    few = likeness.BatchOptions(classes=3, per_class=2, max_batches=2)
    batches = list(loader(NeighbourClassBatches(daemon.address, classes40[0], options=few), 0))
    assert len(batches) == 2 and all(len(x.classes) == 3 for x in batches)
    batches = list(
        loader(NeighbourClassBatches(daemon.address, classes40[0], classes=5, options=few), 0)
    )
    assert all(len(x.classes) == 5 for x in batches), "a given P over the options'"

    with SessionFeed(client, coll, "hard", options=likeness.MineOptions(seed=1)) as feed:
        feed.update(likeness.MineOptions(negatives_per_anchor=3), strategy="random")
        assert len(feed.step(ids[:2]).anchor_index) == 6
