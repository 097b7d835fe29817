#!/usr/bin/env python3
"""Evaluate the exported fmnist-pair ONNX model, choose its decision
threshold, and write the fixtures and the manifest.

1. Validation (TEST split, classes 0-5 -- seen classes, unseen images; see
   fmnist_common.pair_validation_set): the threshold is the best-accuracy
   threshold on the clean and re-id validation pairs together, rounded to
   6 decimals.  Nothing from classes 6-9 is used for it.
2. Held-out (tests/fixtures/fmnist, TEST split classes 6-9, built by
   evaluate.py): on the 2000 pairs of pairs.npy, accuracy at that threshold
   (score >= threshold means same), best-threshold accuracy and ROC AUC,
   for clean and re-id queries; re-ranking of the embedder's R nearest
   enrolled images (R = 5, 10, 20) by pair score, recall@1.  The embedder's
   own figures on the same pairs are recomputed with ONNX Runtime.

Everything runs on the ONNX files through ONNX Runtime (CPU, one thread),
i.e. what the daemon runs.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import fmnist_common as fc  # noqa: E402

EMBEDDER_THRESHOLD = 0.531738   # models/fmnist-triplet/model.toml
R_VALUES = (5, 10, 20)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=os.path.join(ROOT, "models", "fmnist-pair"))
    p.add_argument("--embedder", default=os.path.join(ROOT, "models", "fmnist-triplet", "model.onnx"))
    p.add_argument("--fixtures", default=os.path.join(ROOT, "tests", "fixtures", "fmnist"))
    p.add_argument("--results", default=os.path.join(HERE, "artifacts", "pair", "eval_pair_results.json"))
    p.add_argument("--no-write", action="store_true",
                   help="print the figures (and save --results), write no fixture or manifest")
    return p.parse_args()


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def load_fixtures(fx):
    def ld(name):
        return np.load(os.path.join(fx, name), allow_pickle=False)
    return {
        "enrol_images": ld("enrol_images.npy"), "enrol_labels": ld("enrol_labels.npy"),
        "query_clean_images": ld("query_clean_images.npy"),
        "query_reid_images": ld("query_reid_images.npy"),
        "query_labels": ld("query_labels.npy"), "pairs": ld("pairs.npy").astype(np.int64),
    }


def embedder_figures(embed_fn, data, threshold):
    """The embedder on the same pairs: cosine distance, match if <= t."""
    pairs = data["pairs"]
    same = pairs[:, 2].astype(bool)
    emb_e = embed_fn(data["enrol_images"])
    out = {}
    for kind in ("clean", "reid"):
        emb_q = embed_fn(data[f"query_{kind}_images"])
        dist = fc.pair_distances(emb_q, emb_e, pairs)
        t_best, acc_best = fc.best_threshold(dist, same)
        out[kind] = {
            "accuracy_at_threshold": fc.accuracy_at(dist, same, threshold),
            "best_accuracy": acc_best, "best_threshold": t_best,
            "roc_auc": fc.roc_auc(dist, same),
            "recall_at_1": fc.recall_at_1(emb_q, data["query_labels"], emb_e,
                                          data["enrol_labels"]),
        }
    return out


def rates_at(score, same, t):
    same = same.astype(bool)
    pred = np.asarray(score) >= t
    return {"same_pairs_accepted": float(pred[same].mean()),
            "different_pairs_rejected": float((~pred[~same]).mean())}


def main():
    args = parse_args()
    mean, std = fc.NORM_MEAN, fc.NORM_STD
    pair_path = os.path.join(args.model_dir, "model.onnx")
    pair_sess = session(pair_path)
    emb_sess = session(args.embedder)

    def score_fn(a_u8, b_u8, batch=1000):
        out = []
        for i in range(0, len(a_u8), batch):
            out.append(pair_sess.run(["score"], {
                "a": fc.preprocess(a_u8[i:i + batch], mean, std),
                "b": fc.preprocess(b_u8[i:i + batch], mean, std)})[0])
        return np.concatenate(out)

    def embed_fn(u8, batch=1000):
        out = []
        for i in range(0, len(u8), batch):
            out.append(emb_sess.run(["embedding"], {
                "input": fc.preprocess(u8[i:i + batch], mean, std)})[0])
        return np.concatenate(out)

    # ---------------------------------------------------- validation: threshold
    val = fc.pair_validation_set()
    val_same = val["pairs"][:, 2].astype(bool)
    val_fig, val_raw = fc.pair_model_figures(score_fn, embed_fn, val, r_values=R_VALUES)
    both = np.concatenate([val_raw["clean"]["pair_scores"], val_raw["reid"]["pair_scores"]])
    same2 = np.concatenate([val_same, val_same])
    t_raw, _ = fc.score_best_threshold(both, same2)
    threshold = round(t_raw, 6)
    val_fig["clean_plus_reid"] = {
        "best_threshold": t_raw,
        "accuracy_at_threshold": fc.score_accuracy_at(both, same2, threshold)}
    for kind in ("clean", "reid"):
        val_fig[kind]["accuracy_at_threshold"] = fc.score_accuracy_at(
            val_raw[kind]["pair_scores"], val_same, threshold)
    val_emb = embedder_figures(embed_fn, val, EMBEDDER_THRESHOLD)
    # for a like-for-like comparison: the embedder's threshold chosen the
    # same way (validation clean + re-id pairs)
    val_emb_dist = []
    emb_ve = embed_fn(val["enrol_images"])
    for kind in ("clean", "reid"):
        val_emb_dist.append(fc.pair_distances(embed_fn(val[f"query_{kind}_images"]),
                                              emb_ve, val["pairs"]))
    emb_val_t, _ = fc.best_threshold(np.concatenate(val_emb_dist), same2)
    emb_val_t = round(emb_val_t, 6)

    # ---------------------------------------------------- held-out classes 6-9
    data = load_fixtures(args.fixtures)
    same = data["pairs"][:, 2].astype(bool)
    with open(os.path.join(args.fixtures, "expected.json")) as fh:
        expected = json.load(fh)
    ref_emb = np.load(os.path.join(args.fixtures, "reference_embeddings.npy"))
    got_emb = embed_fn(data["enrol_images"][:16])
    assert np.abs(got_emb - ref_emb).max() < 1e-5, "embedder output differs from its fixture"

    fig, raw = fc.pair_model_figures(score_fn, embed_fn, data, threshold=threshold,
                                     r_values=R_VALUES)
    emb = embedder_figures(embed_fn, data, EMBEDDER_THRESHOLD)
    for kind in ("clean", "reid"):
        assert abs(emb[kind]["recall_at_1"] - expected[f"model_{kind}"]["recall_at_1"]) < 1e-9
        assert abs(fig[kind]["embedder_recall_at_1"] - emb[kind]["recall_at_1"]) < 1e-9
        fig[kind]["rates_at_threshold"] = rates_at(raw[kind]["pair_scores"], same, threshold)
        d = fc.pair_distances(embed_fn(data[f"query_{kind}_images"]),
                              embed_fn(data["enrol_images"]), data["pairs"])
        emb[kind]["accuracy_at_validation_threshold"] = fc.accuracy_at(d, same, emb_val_t)
        emb[kind]["rates_at_threshold"] = rates_at(-d, same, -EMBEDDER_THRESHOLD)

    # symmetry on the held-out pairs (the graph may or may not enforce it)
    qa = data["query_clean_images"][data["pairs"][:, 0]]
    eb = data["enrol_images"][data["pairs"][:, 1]]
    asym = float(np.abs(score_fn(qa, eb) - score_fn(eb, qa)).max())

    summary = {
        "model": pair_path,
        "threshold": threshold,
        "validation": {"pair": val_fig, "embedder": val_emb,
                       "embedder_threshold_chosen_on_validation": emb_val_t},
        "heldout": {"pair": fig, "embedder": emb},
        "max_abs_score_asymmetry_heldout_clean": asym,
    }
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as fh:
        json.dump(summary, fh, indent=2)
    if args.no_write:
        return

    # ---------------------------------------------------------- fixtures
    rows = data["pairs"][:32]
    ref = score_fn(data["query_clean_images"][rows[:, 0]],
                   data["enrol_images"][rows[:, 1]]).astype(np.float32)
    np.save(os.path.join(args.fixtures, "pair_reference_scores.npy"), ref, allow_pickle=False)

    def r(v):
        return round(float(v), 6)

    def pair_block(f):
        return {"accuracy_at_threshold": r(f["accuracy_at_threshold"]),
                "best_accuracy": r(f["best_accuracy"]),
                "best_threshold": r(f["best_threshold"]),
                "roc_auc": r(f["roc_auc"]),
                "rerank_recall_at_1": {k: r(v) for k, v in f["rerank_recall_at_1"].items()}}

    def emb_block(f):
        return {"accuracy_at_threshold": r(f["accuracy_at_threshold"]),
                "best_accuracy": r(f["best_accuracy"]),
                "best_threshold": r(f["best_threshold"]),
                "roc_auc": r(f["roc_auc"]),
                "recall_at_1": r(f["recall_at_1"])}

    pair_expected = {
        "model": "fmnist-pair",
        "threshold": threshold,
        "clean": pair_block(fig["clean"]),
        "reid": pair_block(fig["reid"]),
        "embedder": {"threshold": EMBEDDER_THRESHOLD,
                     "clean": emb_block(emb["clean"]), "reid": emb_block(emb["reid"])},
        "reference_scores": "pair_reference_scores.npy: float32 [32], ORT score for "
                            "pairs.npy rows 0..31 with a = query_clean_images[q], "
                            "b = enrol_images[e], both preprocessed (pixel/255 - 0.2844)/0.3542",
        "notes": "Pairs are pairs.npy (2000, half same class), classes 6-9, never seen in "
                 "training. accuracy_at_threshold: score >= threshold means same; the "
                 "threshold was chosen on validation pairs from the TEST split of classes "
                 "0-5 (clean and re-id together), not on these pairs. best_accuracy / "
                 "best_threshold: best threshold chosen on these pairs (optimistic). "
                 "roc_auc: of the score for 'same'. rerank_recall_at_1[R]: the R nearest "
                 "enrolled images by the embedder's cosine distance, re-ordered by pair "
                 "score descending (ties: smaller distance first); hit if the new top "
                 "item has the query's label. embedder: cosine distance, match if "
                 "distance <= its manifest threshold 0.531738 (which was chosen on the "
                 "clean held-out pairs themselves). Scores near the threshold can move "
                 "by ~1e-6 between runtimes: allow a pair or two of slack.",
    }
    with open(os.path.join(args.fixtures, "pair_expected.json"), "w") as fh:
        json.dump(pair_expected, fh, indent=2)
        fh.write("\n")

    toml = f"""name = "fmnist-pair"
version = "1"
[pair]
file = "model.onnx"
inputs = ["a", "b"]
output = "score"
threshold = {threshold:.6f}   # same when score >= threshold
[pair.image]
channels = 1
height = 28
width = 28
resize = "bilinear"
mean = [{mean}]
std = [{std}]
"""
    with open(os.path.join(args.model_dir, "model.toml"), "w") as fh:
        fh.write(toml)
    print("wrote", os.path.join(args.fixtures, "pair_reference_scores.npy"),
          os.path.join(args.fixtures, "pair_expected.json"),
          os.path.join(args.model_dir, "model.toml"))


if __name__ == "__main__":
    main()
