"""Smoke tests of training/experiment.py's likeness methods (issues 9 and 17): a few steps of
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


def test_semihard_ref_loss_matches_pml():
    """Round two's memory term (issue 17): the sorted-window semi-hard triplet loss
    against reference vectors gives pytorch-metric-learning's figure (TripletMarginMiner
    semihard + TripletMarginLoss with ref_emb), triplet count included."""
    import torch
    from pytorch_metric_learning import losses, miners

    ex = load_experiment()
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        e = torch.nn.functional.normalize(torch.randn(24, 8, generator=gen), dim=1)
        y = torch.randint(0, 5, (24,), generator=gen)
        r = torch.nn.functional.normalize(torch.randn(60, 8, generator=gen), dim=1)
        ry = torch.randint(0, 5, (60,), generator=gen)
        e.requires_grad_(True)
        trip = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(e, y, r, ry)
        want = losses.TripletMarginLoss(margin=0.2)(e, y, trip, r, ry)
        got, n = ex.semihard_ref_loss(e, y, r, ry, margin=0.2)
        assert n == len(trip[0]) > 0
        assert abs(float(got.detach()) - float(want.detach())) < 1e-5
        g_want = torch.autograd.grad(want, e)[0]
        g_got = torch.autograd.grad(got, e)[0]
        assert torch.allclose(g_got, g_want, atol=1e-5)


@pytest.mark.parametrize("method", ["xbm", "likeness-memory", "likeness-batches",
                                    "likeness-batches-memory"])
def test_round_two_training_steps(client, method):
    """A few steps of each round-two method on the fixture images: P x K batches with
    an in-batch miner, plus an in-process queue (xbm), the daemon's Session memory, or
    MineBatches' neighbour-class batches; labels always agree with the data."""
    import torch

    torch.set_num_threads(1)
    ex = load_experiment()
    args = ex.parse_args(["--steps", "8", "--warmup", "3", "--refresh", "3",
                          "--eval-every", "4", "--batch", "24", "--pk-classes", "4",
                          "--memory", "96", "--memory-negatives", "2"])
    run = ex.Run(tiny_benchmark(), method, 0, args, client=client)
    curve, info = run.train()
    assert len(curve["loss"]) == 8
    assert all(math.isfinite(v) for v in curve["loss"])
    assert info["mined"]["label_violations"] == 0
    r2 = info["round2"]
    if method in ex.MEMORY_METHODS:
        assert r2["memory_steps"] == 5 and r2["memory_refs"] > 0
    if method in ex.NEIGHBOUR_METHODS:
        assert r2["neighbour_batches"] == 5 and info["refresh_seconds"] > 0
    figures = run.evaluate()
    assert 0.0 <= figures["clean"]["recall_at_1"] <= 1.0
    if method != "xbm":
        assert run.collection not in [c.name for c in client.list_collections()]


def test_activate_training_steps(client):
    """likeness-batches-activate (issue 17, equal trainer compute): the trainer never
    embeds the training set; it publishes version 0 and creates the collection with it
    (the images as PNG inputs), then at the end of the warm-up and every --refresh
    steps publishes its network and activates it, training on while the daemon
    re-embeds. Neighbour batches start once the first activation is done (at the next
    refresh at the latest, which waits for it), the stored vectors are the published
    network's, and labels always agree with the data. Needs onnx for the export."""
    import torch

    torch.set_num_threads(1)
    ex = load_experiment()
    args = ex.parse_args(["--steps", "16", "--warmup", "3", "--refresh", "6",
                          "--eval-every", "8", "--batch", "24", "--pk-classes", "4"])
    run = ex.Run(tiny_benchmark(), "likeness-batches-activate", 0, args, client=client)
    curve, info = run.train()
    assert len(curve["loss"]) == 16
    assert all(math.isfinite(v) for v in curve["loss"])
    assert info["mined"]["label_violations"] == 0
    act = info["activate"]
    # versions 0 (the collection's first) and 1-3, activated at steps 3, 9 and 15
    assert act["versions"] == 4
    assert [a["step"] for a in act["activations"]] == [3, 9, 15]
    assert [a["version"] for a in act["activations"]] == ["1", "2", "3"]
    assert all(a["finished"] for a in act["activations"][:2])
    assert all(a["items"] == len(run.y) for a in act["activations"][:2])
    first = act["first_neighbour_step"]
    assert 4 <= first <= 9
    assert info["round2"]["neighbour_batches"] == 16 - first
    assert act["steps_during_activations"] >= first - 3
    # the daemon's vectors of version 1 are the trainer's network's outputs
    assert act["check_max_abs_diff"] < 1e-4
    assert act["enrol_seconds"] > 0 and info["refresh_seconds"] > 0
    figures = run.evaluate()
    assert 0.0 <= figures["clean"]["recall_at_1"] <= 1.0
    assert run.collection not in [c.name for c in client.list_collections()]


def load_ranks():
    """training/ranks.py as the module `ranks`, importable by name: its rank processes
    are spawned, and unpickle their entry point from it."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "training"))
    return importlib.import_module("ranks")


@pytest.mark.parametrize("label", ["xbm-gather", "likeness-memory", "likeness-batches-activate"])
def test_two_ranks_train_one_network(client, label):
    """training/ranks.py (issue 17 (b)): two gloo ranks, each its own process with
    its own batches, average their gradients every step, so they end with the same
    weights; the likeness methods share one collection (one name for both ranks,
    created by rank 0 and gone at the end); xbm-gather's queue holds both ranks'
    batches."""
    dist = load_ranks()
    argv = ["--steps", "12", "--warmup", "4", "--refresh", "4", "--eval-every", "6",
            "--batch", "24", "--pk-classes", "4", "--memory", "96"]
    r = dist.run_one(label, 0, 2, argv, client.address, bench=tiny_benchmark())
    info = r["info"]
    assert info["weights_max_diff_across_ranks"] == 0.0
    assert len(info["trainer_cpu_seconds_per_rank"]) == 2
    assert all(math.isfinite(v) for v in r["curve"]["loss"]) and len(r["curve"]["loss"]) == 12
    assert info["mined"]["label_violations"] == 0
    r2 = info["round2"]
    if label == "xbm-gather":
        # from step 4 on, against a full queue of 96 = both ranks' last 2 batches
        assert r2["memory_steps"] == 8 and r2["memory_refs"] == 8 * 96
    elif label == "likeness-memory":
        assert r2["memory_steps"] > 0 and r2["memory_refs"] > 0
    else:
        assert info["activate"]["versions"] >= 3 and r2["neighbour_batches"] > 0
    assert not [c.name for c in client.list_collections() if c.name.startswith("smoke-")]
