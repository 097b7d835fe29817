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

from likeness.torch import (  # noqa: E402
    MinedPairDataset,
    MinedTripletDataset,
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
