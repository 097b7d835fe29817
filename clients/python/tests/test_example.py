"""examples/train_neighbour_batches.py end to end (issue 17), on its small Latin set.

A few steps of neighbour-class training against the test daemon, each refresh an ONNX
export that is published and activated, then a gallery re-embedded by the final
version. What is checked is what the daemon did, measured here: the published versions
are served, the stored vectors are the new version's outputs computed locally by ONNX
Runtime on the stored images, and recall@1 through the daemon's search is far above
chance. Skipped without torch and pytorch-metric-learning; onnx and onnxruntime are in
requirements-test.txt (the export needs onnx, the check onnxruntime)."""

from __future__ import annotations

import importlib.util
import io
import itertools

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")

EXAMPLE = REPO / "clients" / "python" / "examples" / "train_neighbour_batches.py"
_runs = itertools.count()


def load_example():
    spec = importlib.util.spec_from_file_location("train_neighbour_batches", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(daemon, tmp_path_factory):
    """One run: 30 warm-up steps, 30 neighbour-batch steps refreshed at steps 0 and 15,
    so versions 0 (untrained), 1, 2 (the training collection's last) and 3 (final).
    About 10 s on 2 cores."""
    example = load_example()
    name = f"latin-test-{next(_runs)}"
    return example.main([
        "--address", daemon.address, "--data", "latin", "--fonts", "12",
        "--name", name, "--out", str(tmp_path_factory.mktemp("example")),
        "--warmup", "30", "--steps", "30", "--refresh", "15",
        "--classes", "16", "--per-class", "3",
    ])


def ort_embed(onnx_path, inputs, mean, std):
    """What the daemon should store: the manifest's preprocessing (pixels to [0, 1],
    then mean and std) and the exported graph, run here by ONNX Runtime."""
    import onnxruntime as ort
    from PIL import Image

    x = np.stack([np.asarray(Image.open(io.BytesIO(i.image)), dtype=np.float32) / 255.0
                  for i in inputs])
    x = ((x - mean) / std)[:, None].astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"input": x})[0]


def test_every_version_is_published_and_served(client, run):
    assert run["versions"] == ["0", "1", "2", "3"]
    served = {m.name: m for m in client.list_models()}
    for v in run["versions"]:
        m = served[f"{run['model']}@{v}"]
        assert (m.version, m.kind, m.dimension) == (v, "embedder", 64)


def test_activation_reembedded_the_training_collection(client, run):
    info = client.get_collection(run["train_collection"])
    # Activated at neighbour steps 0 and 15: the collection is on version 2 now.
    assert (info.model, info.model_version) == (run["model"], "2")
    assert info.activation.state == "done" and info.count == run["train_count"]
    ids = [f"t{i}" for i in range(0, run["train_count"], max(1, run["train_count"] // 40))]
    items = client.get(run["train_collection"], ids, with_vectors=True, with_inputs=True)
    assert items.ids == ids
    now = ort_embed(run["onnx"]["2"], items.inputs, run["mean"], run["std"])
    before = ort_embed(run["onnx"]["1"], items.inputs, run["mean"], run["std"])
    np.testing.assert_allclose(items.vectors, now, atol=1e-4)
    # and they are not what the previous version made of the same images
    assert np.abs(items.vectors - before).max() > 1e-2


def test_the_gallery_holds_its_enrolment_reembedded_by_the_final_version(client, run):
    coll, n = run["gallery_collection"], run["gallery_count"]
    info = client.get_collection(coll)
    assert (info.model, info.model_version, info.count) == (run["model"], "3", n)
    items = client.get(coll, [f"g{i}" for i in range(n)], with_vectors=True, with_inputs=True)
    assert len(items) == n and items.labels == run["gallery_labels"]
    want = ort_embed(run["onnx"]["3"], items.inputs, run["mean"], run["std"])
    np.testing.assert_allclose(items.vectors, want, atol=1e-4)
    assert np.abs(items.vectors - ort_embed(run["onnx"]["0"], items.inputs, run["mean"],
                                            run["std"])).max() > 1e-2


def test_recall_through_the_daemon_is_far_above_chance(run):
    # 47 unseen characters (25 on a machine without fonts: Pillow's own font has no
    # Greek or Cyrillic), so chance is about 0.02. Queries searched against vectors
    # that are not their images' (another network, or items and labels out of step)
    # land near chance. Measured with 12 faces: this 60-step run 0.39-0.40 (seeds
    # 0-2); the untrained version 0, which the gallery keeps when the final
    # activation is skipped, 0.12-0.19; raw pixels 0.63 (60 steps do not beat pixels
    # on clean queries). With DejaVu's 6 core faces only, 0.36; with Pillow's font
    # only, 0.96 of 25. 10x chance, about 0.21, fails the broken runs and leaves
    # room for another machine's fonts.
    chance = 1.0 / run["test_classes"]
    final = run["recall_at_1"][f"version {run['versions'][-1]}"]
    assert final["clean"] > 10 * chance, run["recall_at_1"]
