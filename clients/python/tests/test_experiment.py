"""Smoke test of training/experiment.py's likeness methods (issue 9): a few steps of
triplet loss on SEMI_HARD triplets and of the distance-based logistic loss on mined
pairs, against the test daemon, on the 400 committed Fashion-MNIST fixture images
(tests/fixtures/fmnist), so it needs no dataset package. Skipped without torch and
pytorch-metric-learning."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")

FIXTURES = REPO / "tests" / "fixtures" / "fmnist"


def load_experiment():
    spec = importlib.util.spec_from_file_location(
        "experiment", REPO / "training" / "experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_benchmark():
    """The enrolled fixture images train; the queries are validation and test."""
    f = {n: np.load(FIXTURES / f"{n}.npy") for n in (
        "enrol_images", "enrol_labels", "query_clean_images", "query_reid_images",
        "query_labels", "pairs")}
    half = np.arange(len(f["query_labels"])) % 2 == 0
    return {
        "name": "smoke",
        "train_images": f["enrol_images"],
        "train_labels": f["enrol_labels"],
        "val": {"enrol": f["query_clean_images"][half],
                "enrol_labels": f["query_labels"][half],
                "query": f["query_clean_images"][~half],
                "query_labels": f["query_labels"][~half]},
        "test": {"enrol": f["enrol_images"], "enrol_labels": f["enrol_labels"],
                 "query": f["query_clean_images"], "reid": f["query_reid_images"],
                 "query_labels": f["query_labels"], "pairs": f["pairs"].astype(np.int64)},
    }


@pytest.mark.parametrize("method", ["likeness-semihard", "likeness-dbl"])
def test_mined_training_steps(client, method):
    import torch

    torch.set_num_threads(1)
    ex = load_experiment()
    args = ex.parse_args(["--steps", "6", "--refresh", "3", "--eval-every", "3",
                          "--anchors", "8", "--batch", "24"])
    run = ex.Run(tiny_benchmark(), method, 0, args, client=client)
    curve, info = run.train()
    assert len(curve["loss"]) == 6
    assert all(math.isfinite(v) for v in curve["loss"])
    mined = info["mined"]["pairs" if method == "likeness-dbl" else "triplets"]
    assert mined > 0
    # positives share the anchor's label, negatives never do
    assert info["mined"]["label_violations"] == 0
    assert info["refresh_seconds"] > 0
    assert len(curve["val_recall_at_1"]) == 2
    figures = run.evaluate()
    for kind in ("clean", "reid"):
        assert 0.0 <= figures[kind]["recall_at_1"] <= 1.0
    # the run deletes its collection
    assert run.collection not in [c.name for c in client.list_collections()]
