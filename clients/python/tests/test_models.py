"""Publishing a model and switching a collection to it, through the client."""

from __future__ import annotations

import builtins
import itertools
import shutil

import numpy as np
import pytest
from conftest import REPO

import likeness

PROJ = REPO / "tests" / "fixtures" / "proj"
_versions = itertools.count()


def _manifest(version: str) -> str:
    """The fixture's manifest at another version, without its digest (the client adds
    it from the bytes)."""
    text = (PROJ / "model.toml").read_text()
    lines = [l for l in text.splitlines() if not l.startswith("sha256")]
    return "\n".join(
        f'version = "{version}"' if l.startswith("version") else l for l in lines
    ) + "\n"


def _images(n: int):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n)]


def test_publish_serves_the_new_version_and_refuses_a_corrupt_one(client):
    version = f"py{next(_versions)}"
    onnx = (PROJ / "proj.onnx").read_bytes()
    bad = bytearray(onnx)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(likeness.InvalidArgument, match="SHA-256"):
        # A digest that the corrupted bytes do not match.
        client.publish(
            "fmnist-triplet",
            f'sha256 = "{__import__("hashlib").sha256(onnx).hexdigest()}"\n' + _manifest(version),
            bytes(bad),
        )
    assert f"fmnist-triplet@{version}" not in {m.name for m in client.list_models()}

    info = client.publish("fmnist-triplet", _manifest(version), onnx, chunk_bytes=50_000)
    assert (info.name, info.version, info.dimension) == (f"fmnist-triplet@{version}", version, 64)
    images = _images(3)
    new = client.embed(images, info.name)
    old = client.embed(images, "fmnist-triplet")
    assert new.shape == (3, 64) and np.abs(new - old).max() > 0.05
    with pytest.raises(likeness.AlreadyExists):
        client.publish("fmnist-triplet", _manifest(version), onnx)


def test_publish_closes_the_files_it_opens(client, tmp_path, monkeypatch):
    version = f"py{next(_versions)}"
    (tmp_path / "model.toml").write_text(_manifest(version))
    shutil.copyfile(PROJ / "proj.onnx", tmp_path / "proj.onnx")
    opened = []
    real_open = builtins.open

    def tracked_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(builtins, "open", tracked_open)
    info = client.publish("fmnist-triplet", tmp_path / "model.toml")
    monkeypatch.undo()
    assert info.version == version
    names = [f.name for f in opened]
    assert str(tmp_path / "model.toml") in names and str(tmp_path / "proj.onnx") in names
    assert all(f.closed for f in opened), [f.name for f in opened if not f.closed]


def test_activate_reembeds_a_collection(client, name):
    version = f"py{next(_versions)}"
    client.publish("fmnist-triplet", _manifest(version), PROJ / "proj.onnx")
    images = _images(40)
    client.create_collection(name, model="fmnist-triplet")
    ids = [f"i{k}" for k in range(len(images))]
    client.upsert(name, ids, inputs=images, labels=[str(k % 4) for k in range(len(images))])

    started = client.activate(name, "fmnist-triplet", version)
    assert started.activation is not None and started.activation.state in ("running", "done")
    done = client.wait_activation(name, timeout=60)
    assert done.model_version == version and done.count == len(images)
    assert done.activation.state == "done" and done.activation.done >= len(images)
    got = client.get(name, ids, with_vectors=True).vectors
    want = client.embed(images, f"fmnist-triplet@{version}")
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Queries by image now embed with the new version too.
    r = client.search(name, images[5], k=1)
    assert r.ids == ["i5"]

    with pytest.raises(likeness.LikenessError, match="already uses"):
        client.activate(name, "fmnist-triplet", version)
