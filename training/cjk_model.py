"""Trains, exports and evaluates the shipped `cjk` model (models/cjk/).

The winner of docs/experiment.md's second round, likeness-batches-activate, with the
settings of its 2,100-step runs (seed 0): P x K batches of 24 neighbouring characters
chosen by the daemon from the stored training glyphs, which the daemon re-embeds with
each published version of the network (Models.Publish + Activate) while training goes
on. A daemon is started here (or --address names one).

Then: the network is exported to models/cjk/model.onnx; every figure is measured with
ONNX Runtime on that file, not the torch module; the manifest's threshold and distance
calibration are fitted on the validation characters' pairs (never the test pairs);
tests/fixtures/cjk/ gets 400 enrolled and 400 query glyphs of unseen characters with
the figures the integration test checks; results/cjk-model.json keeps everything.

    OMP_NUM_THREADS=1 python3 cjk_model.py            # needs setup-cjk.sh's fonts
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import evaluate  # noqa: E402
import experiment as ex  # noqa: E402
import fmnist_common as fc  # noqa: E402
import onnx_release  # noqa: E402

METHOD = "likeness-batches-activate"
# docs/experiment.md "Reproduce" (the 2,100-step runs)
SETTINGS = ["--benchmark", "cjk", "--steps", "2100", "--eval-every", "150",
            "--pk-classes", "24", "--warmup", "240", "--refresh", "300",
            "--memory", "16384"]
FIXTURE_CLASSES = 80  # test characters in tests/fixtures/cjk (5 enrolled + 5 queries each)


def ort_embedder(onnx_path, mean, std):
    """uint8 [n,28,28] -> [n,d] through ONNX Runtime with the manifest's preprocessing."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])

    def embed(u8):
        x = (u8.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
        x = x[:, None, :, :].astype(np.float32)
        return np.concatenate([sess.run(None, {"input": x[i:i + 512]})[0]
                               for i in range(0, len(x), 512)])
    return embed


def shipped_fmnist_embedder():
    """The current default model, for comparison on the same glyphs."""
    import tomllib
    folder = os.path.join(ROOT, "models", "fmnist-triplet")
    with open(os.path.join(folder, "model.toml"), "rb") as fh:
        m = tomllib.load(fh)["towers"][0]["image"]
    return ort_embedder(os.path.join(folder, "model.onnx"), m["mean"][0], m["std"][0])


def calibrate(embed, val):
    """Threshold (best accuracy) and the distance-based logistic fit on the validation
    characters' clean pairs, with cosine distance (the manifest's metric)."""
    q, e = embed(val["query"]), embed(val["enrol"])
    same = val["pairs"][:, 2].astype(bool)
    dist = fc.pair_distances(q, e, val["pairs"])
    t, acc = fc.best_threshold(dist, same)
    m, s, ll = evaluate.fit_dbl(dist, same)
    return {"threshold": float(t), "val_accuracy": float(acc), "dbl_margin": float(m),
            "dbl_scale": float(s), "dbl_mean_log_lik": float(ll)}


def per_metric(embed, test, val):
    out = ex.protocol_metrics(embed, test, val)
    return {k: {n: round(float(v), 4) for n, v in d.items()} for k, d in out.items()}


def write_fixtures(embed, test, threshold, folder):
    """The first FIXTURE_CLASSES test characters: 5 enrolled and 5 query glyphs each
    (clean and re-id), 16 reference embeddings and the figures on them."""
    labels = test["enrol_labels"]
    keep = np.unique(labels)[:FIXTURE_CLASSES]
    ei = np.flatnonzero(np.isin(test["enrol_labels"], keep))
    qi = np.flatnonzero(np.isin(test["query_labels"], keep))
    enrol, query, reid = test["enrol"][ei], test["query"][qi], test["reid"][qi]
    el, ql = test["enrol_labels"][ei].astype(np.int64), test["query_labels"][qi].astype(np.int64)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "enrol_images.npy"), enrol)
    np.save(os.path.join(folder, "enrol_labels.npy"), el)
    np.save(os.path.join(folder, "query_clean_images.npy"), query)
    np.save(os.path.join(folder, "query_reid_images.npy"), reid)
    np.save(os.path.join(folder, "query_labels.npy"), ql)
    e = embed(enrol)
    np.save(os.path.join(folder, "reference_embeddings.npy"), e[:16].astype(np.float32))
    pairs = fc.balanced_pairs(ql, el, 2000, 20260109).astype(np.int32)
    np.save(os.path.join(folder, "pairs.npy"), pairs)
    same = pairs[:, 2].astype(bool)
    expected = {"classes": int(len(keep)), "enrol": int(len(ei)), "queries": int(len(qi)),
                "threshold": round(threshold, 6)}
    for kind, qs in (("clean", query), ("reid", reid)):
        q = embed(qs)
        dist = fc.pair_distances(q, e, pairs)
        # the names of tests/fixtures/fmnist/expected.json, which the same test reads
        at = "accuracy_at_manifest_threshold" if kind == "clean" else "accuracy_at_clean_threshold"
        expected[f"model_{kind}"] = {
            "recall_at_1": round(float(fc.recall_at_1(q, ql, e, el)), 4),
            at: round(float(np.mean((dist <= threshold) == same)), 4)}
    with open(os.path.join(folder, "expected.json"), "w") as fh:
        json.dump(expected, fh, indent=1)
    return expected


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", help="an existing daemon; default: start one")
    p.add_argument("--models", default=os.path.join(ROOT, "models"))
    p.add_argument("--fixtures", default=os.path.join(ROOT, "tests", "fixtures", "cjk"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "cjk-model.json"))
    p.add_argument("--smoke", action="store_true",
                   help="60 steps, to check the pipeline (write --models etc. elsewhere)")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    smoke = ["--steps", "60", "--warmup", "20", "--refresh", "20", "--eval-every", "30"]
    args = ex.parse_args(SETTINGS + ["--seeds", str(a.seed)] + (smoke if a.smoke else []))
    t0 = time.perf_counter()
    bench = ex.load_benchmark(args)
    print(json.dumps(bench["describe"]), f"({time.perf_counter() - t0:.0f}s)", flush=True)

    import likeness
    daemon = None
    if a.address is None:
        daemon = ex.Daemon(args.binary)
        a.address = daemon.address
    client = likeness.Client(a.address, timeout=120)
    client.wait_ready(60)
    try:
        run = ex.Run(bench, METHOD, a.seed, args, client, daemon)
        t = time.perf_counter()
        curve, info = run.train()
        train_wall = time.perf_counter() - t
    finally:
        client.close()
        if daemon is not None:
            daemon.stop()

    # The shipped file, and every figure through it.
    folder = os.path.join(a.models, "cjk")
    tmp = tempfile.mkdtemp(prefix="likeness-cjk-")
    try:
        manifest = onnx_release.export(run.model, tmp, "cjk", "1", run.mean, run.std)
        os.makedirs(folder, exist_ok=True)
        shutil.copy(os.path.join(os.path.dirname(manifest), "model.onnx"),
                    os.path.join(folder, "model.onnx"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mean, std = round(run.mean, 4), round(run.std, 4)
    embed = ort_embedder(os.path.join(folder, "model.onnx"), mean, std)
    with torch.no_grad():  # the export against torch, on the first 256 test glyphs
        x = bench["test"]["query"][:256]
        want = run.model.eval()((torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
                                 - mean) / std).numpy()
    export_diff = float(np.abs(embed(x) - want).max())
    cal = calibrate(embed, bench["val"])
    with open(os.path.join(folder, "model.toml"), "w") as fh:
        fh.write(onnx_release.MANIFEST.format(name="cjk", version="1", dim=fc.EMBED_DIM,
                                              mean=mean, std=std)
                 .replace('metric = "cosine"\n',
                          'metric = "cosine"\n'
                          f'dbl_margin = {cal["dbl_margin"]:.4f}\n'
                          f'dbl_scale = {cal["dbl_scale"]:.4f}\n'
                          f'threshold = {cal["threshold"]:.6f}\n'))
    test, val = bench["test"], bench["val"]
    res = {
        "method": METHOD, "seed": a.seed, "settings": vars(args) | {"binary": None,
                                                                     "address": None},
        "describe": bench["describe"], "train_wall_seconds": train_wall,
        "curve": curve, "info": info, "export_max_abs_diff": export_diff,
        "preprocessing": {"mean": mean, "std": std}, "calibration_val": cal,
        "model": per_metric(embed, test, val),
        "fmnist_triplet": per_metric(shipped_fmnist_embedder(), test, val),
        "pixels": per_metric(ex.pixels, test, val),
        "fixtures": write_fixtures(embed, test, cal["threshold"], a.fixtures),
        "parameters": int(sum(p.numel() for p in run.model.parameters())),
        "onnx_bytes": os.path.getsize(os.path.join(folder, "model.onnx")),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "numpy": np.__version__, "cpu": platform.processor() or
                        platform.machine(), "nproc": os.cpu_count()},
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: res[k] for k in ("model", "fmnist_triplet", "pixels",
                                          "calibration_val", "fixtures",
                                          "export_max_abs_diff")}, indent=1))


if __name__ == "__main__":
    main()
