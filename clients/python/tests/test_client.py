"""The client against a real daemon: collections, items, search, errors, judging, embedding."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from conftest import clustered

import likeness


def cosine_distance(a, b):
    return 1.0 - (a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


def test_collections_crud(client, name):
    info = client.create_collection(name, 8, "l2", precision="f16", connectivity=8)
    assert (info.name, info.dimension, info.metric, info.precision) == (name, 8, "l2", "f16")
    assert info.connectivity == 8 and info.count == 0
    assert client.get_collection(name).metric == "l2"
    assert name in [c.name for c in client.list_collections()]

    with pytest.raises(likeness.AlreadyExists) as e:
        client.create_collection(name, 8)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert name in e.value.message

    client.upsert(name, ["a", "b"], np.eye(2, 8))
    assert client.get_collection(name).count == 2
    assert client.delete_collection(name) == 2
    with pytest.raises(likeness.NotFound) as e:
        client.get_collection(name)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert isinstance(e.value, likeness.LikenessError)
    assert str(e.value).startswith("NOT_FOUND: ")


def test_bad_collection_names_the_field(client):
    with pytest.raises(likeness.InvalidArgument) as e:
        client.create_collection("no spaces allowed", 4)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in e.value.message
    with pytest.raises(ValueError, match="unknown metric"):
        client.create_collection("x", 4, "manhattan")


def test_upsert_in_chunks_then_get(client, name, capsys):
    client.create_collection(name, 8, "cosine")
    rng = np.random.default_rng(3)
    n = 1000
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    ids = [f"v{i}" for i in range(n)]
    labels = [f"k{i % 7}" for i in range(n)]
    metadata = [{"row": str(i)} for i in range(n)]
    assert (
        client.upsert(
            name,
            ids,
            vectors,
            labels=labels,
            metadata=metadata,
            generation=5,
            batch_size=128,
            progress=True,
        )
        == n
    )
    assert "1000/1000" in capsys.readouterr().err, "the progress bar reached the end"
    assert client.get_collection(name).count == n

    got = client.get(name, ["v999", "nope", "v0", "v500"], with_vectors=True)
    assert got.ids == ["v999", "v0", "v500"], "unknown ids are left out, order kept"
    assert got.labels == ["k5", "k0", "k3"]
    assert got.metadata == [{"row": "999"}, {"row": "0"}, {"row": "500"}]
    assert got.vectors.dtype == np.float32 and got.vectors.shape == (3, 8)
    np.testing.assert_array_equal(got.vectors, vectors[[999, 0, 500]])
    np.testing.assert_array_equal(got.generations, [5, 5, 5])
    assert client.get(name, ["v1"]).vectors is None

    # Float64 input and per-item generations; replacing keeps the count.
    client.upsert(
        name, ["v0", "v1"], vectors[:2].astype(np.float64) * 2, labels=["z", "z"], generation=[7, 8]
    )
    got = client.get(name, ["v0", "v1"], with_vectors=True)
    assert got.labels == ["z", "z"] and list(got.generations) == [7, 8]
    np.testing.assert_allclose(got.vectors, vectors[:2] * 2)
    assert client.get_collection(name).count == n
    assert client.delete(name, ["v0", "v1", "nope"]) == 2
    assert len(client.get(name, ["v0", "v1"])) == 0


def test_search_returns_numpy(client, name):
    ids, vectors, labels = clustered(5, 40, 12, seed=4)
    client.create_collection(name, 12, "cosine")
    client.upsert(name, ids, vectors, labels=labels)

    r = client.search(name, vectors[17], k=5, exact=True, with_vectors=True, with_metadata=True)
    assert r.ids[0] == ids[17] and r.distances[0] == pytest.approx(0.0, abs=1e-5)
    assert r.distances.shape == (5,) and r.distances.dtype == np.float32
    assert np.all(np.diff(r.distances) >= 0)
    assert r.vectors.shape == (5, 12)
    expected = sorted(cosine_distance(vectors[17], v) for v in vectors)[:5]
    np.testing.assert_allclose(r.distances, expected, atol=1e-5)
    assert r.pair_scores is None

    # An id query leaves the item itself out; a label filter keeps to the label.
    r = client.search(name, ids[0], k=3, labels=["class-2"])
    assert ids[0] not in r.ids and set(r.labels) == {"class-2"}
    r = client.search(name, list(vectors[0]), k=3, exclude_labels=["class-0"])
    assert "class-0" not in r.labels


def test_search_batch_shapes_and_padding(client, name):
    ids, vectors, labels = clustered(4, 10, 6, seed=5)
    client.create_collection(name, 6, "l2")
    client.upsert(name, ids, vectors, labels=labels)
    queries = vectors[[0, 11, 25]]
    b = client.search_batch(name, queries, k=4, exact=True, with_vectors=True)
    assert b.ids.shape == (3, 4) and b.distances.shape == (3, 4) and b.vectors.shape == (3, 4, 6)
    assert list(b.ids[:, 0]) == [ids[0], ids[11], ids[25]]
    for q, row in zip(queries, b.distances):
        np.testing.assert_allclose(
            row, np.sort(np.linalg.norm(vectors - q, axis=1))[:4], rtol=1e-5, atol=1e-5
        )
    assert list(b.counts) == [4, 4, 4]

    # More k than the filter matches: padded with "" and +inf.
    b = client.search_batch(name, [ids[0], ids[10]], k=12, labels=["class-3"])
    assert list(b.counts) == [10, 10]
    assert list(b.ids[0, 10:]) == ["", ""] and np.all(np.isinf(b.distances[:, 10:]))
    assert set(b[1].labels) == {"class-3"} and len(b) == 2


def test_errors_carry_status_and_field(client, name):
    client.create_collection(name, 4, "cosine")
    bad = np.ones((3, 4), dtype=np.float32)
    bad[2, 1] = np.nan
    with pytest.raises(likeness.InvalidArgument) as e:
        client.upsert(name, ["a", "b", "c"], bad)
    assert "items[2].vector[1]" in e.value.message and '"c"' in e.value.message
    assert client.get_collection(name).count == 0, "a failed request writes nothing"

    with pytest.raises(likeness.InvalidArgument) as e:
        client.upsert(name, ["a"], np.ones((1, 5)))
    assert "items[0].vector" in e.value.message
    with pytest.raises(likeness.InvalidArgument, match="k"):
        client.search(name, np.ones(4), k=0)
    with pytest.raises(likeness.NotFound):
        client.search("no-such-collection", np.ones(4))
    with pytest.raises(ValueError, match="3 labels for 2 ids"):
        client.upsert(name, ["a", "b"], np.ones((2, 4)), labels=["x", "y", "z"])


def test_atomic_upsert_is_all_or_nothing(client, name):
    client.create_collection(name, 4, "cosine")
    vectors = np.ones((10, 4), dtype=np.float32)
    vectors[8, 0] = np.inf
    ids = [f"i{j}" for j in range(10)]
    with pytest.raises(likeness.InvalidArgument):
        client.upsert(name, ids, vectors, batch_size=3, atomic=True)
    assert client.get_collection(name).count == 0
    # Chunked unary calls keep the chunks that were acknowledged before the bad one.
    with pytest.raises(likeness.InvalidArgument):
        client.upsert(name, ids, vectors, batch_size=3)
    assert client.get_collection(name).count == 6
    assert client.upsert(name, ids[:8], vectors[:8], batch_size=3, atomic=True) == 8


def test_classify_verify_calibrate(client, name):
    ids, vectors, labels = clustered(4, 25, 8, spread=0.1, seed=6)
    client.create_collection(name, 8, "cosine")
    client.upsert(name, ids, vectors, labels=labels)
    c = client.classify(name, vectors[30] + 0.01, k=5)
    assert c.label == "class-1" and 0 < c.confidence <= 1
    assert c.votes[0].label == "class-1" and c.votes[0].count >= 1

    cal = client.calibrate(name, pairs=400, seed=1)
    assert cal.pairs == 400 and cal.accuracy > 0.9 and cal.roc_auc > 0.9
    assert client.get_collection(name).threshold == pytest.approx(cal.threshold)

    same = client.verify(name, ids[0], ids[1])
    other = client.verify(name, ids[0], vectors[60])
    assert same.same and not other.same
    assert same.distance < other.distance and same.probability > other.probability
    assert same.pair_score is None


def _digit(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(28, 28), dtype=np.uint8), mode="L")


def test_embed_images_and_tensors(client):
    pytest.importorskip("PIL")
    models = {m.name: m for m in client.list_models()}
    model = models["fmnist-triplet"]
    assert model.kind == "embedder" and model.dimension == 64
    assert client.get_model("fmnist-triplet").towers[0].image.height == 28

    images = [_digit(i) for i in range(3)]
    v = client.embed(images, "fmnist-triplet")
    assert v.shape == (3, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)

    png = io.BytesIO()
    images[1].save(png, format="PNG")
    np.testing.assert_allclose(client.embed([png.getvalue()], "fmnist-triplet")[0], v[1], atol=1e-5)
    np.testing.assert_allclose(
        client.embed(images[1])[0], v[1], atol=1e-5
    )  # default model, one image

    tensors = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    t = client.embed(tensors, "fmnist-triplet", batch_size=2)
    assert t.shape == (5, 64)
    with pytest.raises(likeness.NotFound):
        client.embed(images, "no-such-model")
    with pytest.raises(likeness.InvalidArgument, match=r"inputs\[0\]"):
        client.embed([b"not an image"], "fmnist-triplet")


def test_model_backed_collection_with_inputs(client, name):
    pytest.importorskip("PIL")
    info = client.create_collection(name, model="fmnist-triplet", pair_model="fmnist-pair")
    assert info.dimension == 64 and info.keep_inputs and info.pair_model == "fmnist-pair"
    images = [_digit(i) for i in range(6)]
    client.upsert(
        name, [f"img{i}" for i in range(6)], inputs=images, labels=["a", "a", "a", "b", "b", "b"]
    )
    r = client.search(name, images[4], k=1, exact=True)
    assert r.ids == ["img4"]
    got = client.get(name, ["img4"], with_vectors=True, with_inputs=True)
    assert got.vectors.shape == (1, 64) and got.inputs[0].WhichOneof("kind") == "image"
    v = client.verify(name, images[0], "img0")
    assert v.distance == pytest.approx(0.0, abs=1e-5) and v.pair_score is not None

    # Re-ranked by the pair model: scores come back, best first.
    r = client.search(name, images[2], k=3, rerank=6)
    assert r.pair_scores.shape == (3,) and np.all(np.isfinite(r.pair_scores))
    assert np.all(np.diff(r.pair_scores) <= 0)
    b = client.search_batch(name, [images[2], "img1"], k=2, rerank=4)
    assert b.ids.shape == (2, 2) and b[0].pair_scores.shape == (2,)


def test_unavailable_daemon_raises():
    with likeness.Client("127.0.0.1:1", timeout=2) as c:
        with pytest.raises(likeness.LikenessError) as e:
            c.list_collections()
        assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert not c.serving()
