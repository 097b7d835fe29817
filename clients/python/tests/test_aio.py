"""likeness.aio against a real daemon: the blocking client's surface, awaited."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import numpy as np
import pytest
from conftest import clustered

import likeness
import likeness.aio


def run(coroutine):
    return asyncio.run(coroutine)


def public_methods(cls):
    return {n for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


def test_aio_has_the_blocking_surface():
    sync, aio = likeness.Client, likeness.aio.Client
    names = public_methods(sync)
    assert names == public_methods(aio) and "search" in names
    streams = {"mine_triplets", "mine_pairs", "mine_batches", "session"}
    for name in names:
        s, a = inspect.signature(getattr(sync, name)), inspect.signature(getattr(aio, name))
        assert list(s.parameters.values()) == list(a.parameters.values()), name
        if name in streams:
            assert a.return_annotation.__module__ == "likeness.aio", name
            assert a.return_annotation.__name__ == s.return_annotation.__name__, name
        else:
            assert inspect.iscoroutinefunction(getattr(aio, name)), name
            assert s.return_annotation == a.return_annotation, name
        assert getattr(sync, name).__doc__ == getattr(aio, name).__doc__, name
    assert inspect.signature(likeness.Client.search).return_annotation is likeness.SearchResult
    assert "k nearest" in likeness.aio.Client.search.__doc__
    step = inspect.signature(likeness.aio.Session.step)
    assert list(step.parameters) == list(inspect.signature(likeness.Session.step).parameters)


def test_aio_unary_calls(daemon, client, name):
    ids, vectors, labels = clustered(4, 20, 8, spread=0.1, seed=11)

    async def main():
        async with likeness.aio.Client(daemon.address, timeout=60) as c:
            await c.wait_ready(30)
            assert await c.serving()
            assert not await c.serving("no.such.Service")
            info = await c.create_collection(name, 8, "cosine", precision="f16")
            assert (info.name, info.dimension, info.precision) == (name, 8, "f16")
            with pytest.raises(likeness.AlreadyExists):
                await c.create_collection(name, 8)
            assert (
                await c.upsert(name, ids[:40], vectors[:40], labels=labels[:40], batch_size=16)
                == 40
            )
            assert (
                await c.upsert(name, ids[40:], vectors[40:], labels=labels[40:], atomic=True) == 40
            )
            assert (await c.get_collection(name)).count == 80
            assert name in [x.name for x in await c.list_collections()]

            got = await c.get(name, [ids[5], "nope"], with_vectors=True)
            assert got.ids == [ids[5]] and got.labels == [labels[5]]
            np.testing.assert_allclose(got.vectors[0], vectors[5], atol=1e-2)

            hits = await c.search(name, vectors[3], k=4, exact=True)
            batch = await c.search_batch(name, vectors[[3, 30]], k=4, exact=True)
            cls = await c.classify(name, vectors[30] + 0.01, k=5)
            cal = await c.calibrate(name, pairs=200, seed=1)
            same = await c.verify(name, ids[0], ids[1])
            assert await c.delete(name, [ids[0], "nope"]) == 1

            with pytest.raises(likeness.InvalidArgument, match="k"):
                await c.search(name, vectors[0], k=0)
            with pytest.raises(likeness.NotFound):
                await c.get_collection("no-such-collection")
            with pytest.raises(ValueError, match="3 labels for 2 ids"):
                await c.upsert(name, ["a", "b"], np.ones((2, 8)), labels=["x", "y", "z"])
            return hits, batch, cls, cal, same

    hits, batch, cls, cal, same = run(main())
    # The blocking client gets the same answers from the same collection.
    sync_hits = client.search(name, vectors[3], k=4, exact=True)
    assert hits.ids == sync_hits.ids
    np.testing.assert_allclose(hits.distances, sync_hits.distances, atol=1e-6)
    assert list(batch.ids[0]) == hits.ids and batch.ids.shape == (2, 4)
    assert cls.label == labels[30] and cal.pairs == 200 and same.same
    assert client.get_collection(name).count == 79
    assert client.delete_collection(name) == 79


def test_aio_embed_and_models(daemon, client):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(3)]

    async def main():
        async with likeness.aio.Client(daemon.address, timeout=60) as c:
            models = {m.name: m for m in await c.list_models()}
            assert models["fmnist-triplet"].kind == "embedder"
            assert (await c.get_model("fmnist-triplet")).dimension == 64
            return await c.embed(images), await c.embed(images, "fmnist-triplet", batch_size=2)

    default, named = run(main())
    assert default.shape == (3, 64) and default.dtype == np.float32
    np.testing.assert_allclose(default, client.embed(images, "fmnist-triplet"), atol=1e-5)
    np.testing.assert_allclose(named, default, atol=1e-5)


def test_aio_mining_streams(daemon, labelled, classes40):
    coll, ids, _, labels = labelled
    by_id = dict(zip(ids, labels))

    async def main():
        async with likeness.aio.Client(daemon.address) as c:
            stream = c.mine_triplets(coll, "hard", negatives_per_anchor=2, batch_size=64)
            anchors = set()
            async for b in stream:
                assert all(by_id[a] == by_id[p] for a, p in zip(b.anchor_ids, b.positive_ids))
                assert all(by_id[a] != by_id[n] for a, n in zip(b.anchor_ids, b.negative_ids))
                anchors.update(b.anchor_ids)
            assert anchors == set(ids) and stream.stats.anchors == len(ids)

            pairs = c.mine_pairs(coll, "hard", likeness.MineOptions(max_triplets=50))
            n = 0
            async for p in pairs:
                assert list(p.same) == [by_id[a] == by_id[b] for a, b in zip(p.a_ids, p.b_ids)]
                n += len(p)
            assert n == pairs.stats.pairs > 0

            batches = c.mine_batches(classes40[0], classes=4, per_class=2, max_batches=3)
            got = [b async for b in batches]
            assert len(got) == 3 and all(len(b.classes) == 4 for b in got)
            assert batches.stats.batches == 3

            async with c.mine_triplets(coll, "hard", batch_size=4) as early:
                async for first in early:
                    assert len(first) > 0
                    break
            with pytest.raises(likeness.InvalidArgument, match="shard"):
                async for _ in c.mine_triplets(coll, "hard", shard=(2, 2)):
                    pass
            with pytest.raises(TypeError, match="negatives"):
                c.mine_triplets(coll, "hard", negatives=3)
            # The daemon keeps serving after the cancelled stream.
            assert (await c.get_collection(coll)).count == len(ids)

    run(main())


def test_aio_session(daemon, client, name):
    ids, vectors, labels = clustered(6, 8, 16, seed=12)
    client.create_collection(name, 16, "cosine")
    client.upsert(name, ids, vectors, labels=labels)
    by_id = dict(zip(ids, labels))
    fresh = vectors[:10] + 0.01

    async def main():
        async with likeness.aio.Client(daemon.address) as c:
            async with c.session(name, "hard", with_vectors=True) as s:
                b = await s.step(ids[:10], fresh, step=3, write_back=True)
                assert b.step == 3 and len(b) > 0
                assert all(by_id[a] != by_id[n] for a, n in zip(b.anchor_ids, b.negative_ids))
                s.update(strategy="random", negatives_per_anchor=2)
                b = await s.step(ids[:2])
                assert b.step == 4 and len(b) == 4
                assert b.written_step == 3 and s.written_step == 3
            with pytest.raises(RuntimeError, match="closed"):
                await s.step(ids[:1])

            s = c.session(name, "hard")
            await s.step(ids[:2])
            with pytest.raises(likeness.InvalidArgument, match=r"steps\[1\]\.anchors\[0\]"):
                await s.step(ids[:1], np.ones((1, 3)))
            with pytest.raises(RuntimeError, match="closed"):
                await s.step(ids[:1])
            await s.close()

    run(main())
    got = client.get(name, ids[:10], with_vectors=True)
    np.testing.assert_allclose(got.vectors, fresh, atol=1e-6)
    assert got.generations.tolist() == [3] * 10


def test_aio_unavailable_daemon_raises():
    async def main():
        async with likeness.aio.Client("127.0.0.1:1", timeout=2, retry=None) as c:
            with pytest.raises(likeness.LikenessError) as e:
                await c.list_collections()
            assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert not await c.serving()

    run(main())
