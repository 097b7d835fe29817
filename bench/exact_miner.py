#!/usr/bin/env python3
"""An exact triplet miner, the one a trainer would write without an ANN index.

It is the reference `likeness-bench --only mine` measures likeness's Miner against: the
same vectors, anchors and positives, mined by brute force, then compared with what
likeness chose.

Per block of anchors:
  1. the nearest negatives: with --engine faiss (the default), faiss's exact
     IndexFlatIP (blocked GEMM on BLAS plus heaps, OpenMP threads) for the `pool` +
     (largest label) nearest, the anchor's own label dropped afterwards, the way
     sentence-transformers' mining drops positives from a faiss search; with --engine
     numpy, one GEMM against the whole corpus, the own label struck out through a label
     index, one argpartition per row;
  2. per positive, the semi-hard negative is the nearest negative strictly beyond d_ap:
     inside (d_ap, d_ap + margin) it is semi-hard, past it a fallback (the definition
     the Miner implements). When every pooled negative is nearer than the positive, the
     whole row is searched, so the answer is always exact;
  3. the `hard_k` nearest negatives, for the HARD overlap.

With --engine numpy, rows are split among `--threads` Python threads (--mode rows; numpy
releases the GIL in the GEMM and in argpartition, one BLAS thread each), or the GEMM runs
on `--threads` BLAS threads from one Python thread (--mode blas).

Input (DIR, written by the bench): vectors.npy (N x d float32, unit rows), labels.npy (N
int64), anchors.npy (A int64 rows), positives.npy (A x P int64 rows, -1 for none). With
likeness_semi.npy (A x P, -1 for none), likeness_fallback.npy (A x P uint8) and
likeness_hard.npy (A x K, -1 for none) it also reports agreement. Each run is timed with
one positive per anchor, then with all P.

Output: one JSON object on stdout.

    python3 -m pip install --user numpy faiss-cpu
    python3 bench/exact_miner.py DIR --threads 2
"""

import argparse
import json
import os
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--mode",
        choices=["rows", "blas"],
        default="rows",
        help="rows: anchor blocks split among Python threads, one BLAS thread each; "
        "blas: one Python thread, the GEMM on --threads BLAS threads",
    )
    p.add_argument(
        "--engine",
        choices=["faiss", "numpy"],
        default="faiss",
        help="faiss: IndexFlatIP (exact, BLAS + heaps, OpenMP threads); numpy: the GEMM "
        "and argpartition by hand",
    )
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--pool", type=int, default=64, help="nearest negatives kept per row")
    p.add_argument("--hard-k", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--block-floats",
        type=int,
        default=1 << 24,
        help="similarities held per block (anchors x N), 64 MiB by default",
    )
    return p.parse_args()


ARGS = parse_args()
# Before numpy loads OpenBLAS.
os.environ["OPENBLAS_NUM_THREADS"] = str(
    ARGS.threads if ARGS.mode == "blas" or ARGS.engine == "faiss" else 1
)
os.environ.setdefault("OMP_NUM_THREADS", os.environ["OPENBLAS_NUM_THREADS"])

import numpy as np  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402


def load(name, required=True):
    path = os.path.join(ARGS.dir, name)
    if not os.path.exists(path):
        if required:
            sys.exit(f"{path} not found")
        return None
    return np.load(path)


class LabelIndex:
    """Rows grouped by label: members(l) is a slice of one sorted array."""

    def __init__(self, labels):
        self.order = np.argsort(labels, kind="stable")
        sorted_labels = labels[self.order]
        self.uniq, self.start = np.unique(sorted_labels, return_index=True)
        self.end = np.append(self.start[1:], len(labels))
        self.slot = {int(l): i for i, l in enumerate(self.uniq)}
        self.largest = int((self.end - self.start).max())

    def members(self, label):
        i = self.slot[int(label)]
        return self.order[self.start[i] : self.end[i]]


def pools_numpy(X, labels, index, anchors, k):
    """The k nearest negatives of a block of anchors, nearest first: one GEMM, the own
    label struck out through the label index, one argpartition per row. Also returns
    the similarity rows for the rare full-row search."""
    Q = X[anchors]
    S = Q @ X.T  # B x N similarities; distance = 1 - S
    N = S.shape[1]
    rows, cols = [], []
    for i, a in enumerate(anchors):
        m = index.members(labels[a])
        rows.append(np.full(len(m), i))
        cols.append(m)
    S[np.concatenate(rows), np.concatenate(cols)] = -np.inf
    top = np.argpartition(S, N - k, axis=1)[:, N - k :]
    top_s = np.take_along_axis(S, top, axis=1)
    order = np.argsort(-top_s, axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_s, order, axis=1), S


def pools_faiss(flat, X, labels, index, anchors, k):
    """The same pools from faiss's exact IndexFlatIP: the k + (largest label) nearest,
    then the anchor's own label dropped (how sentence-transformers' mining drops
    positives from a faiss search)."""
    wide = k + index.largest
    sims, ids = flat.search(X[anchors], wide)
    own = labels[ids] == labels[anchors][:, None]
    # Stable: keep the nearest-first order of the rest.
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1), None


def full_row(X, labels, anchor, S_row):
    """Similarities of one anchor to every item, its own label at -inf."""
    row = X @ X[anchor] if S_row is None else S_row.copy()
    row[labels == labels[anchor]] = -np.inf
    return row


def choose(X, labels, anchors, positives, top, top_s, S, margin, hard_k):
    """Exact semi-hard (with fallback) and hard negatives from the sorted pools."""
    B, k = top.shape
    P = positives.shape[1]
    semi = np.full((B, P), -1, dtype=np.int64)
    semi_d = np.full((B, P), np.nan, dtype=np.float32)
    fallback = np.zeros((B, P), dtype=np.uint8)
    pos_ok = positives >= 0
    s_ap = np.einsum("bd,bpd->bp", X[anchors], X[np.where(pos_ok, positives, 0)])
    # Nearest negative strictly beyond each positive: the first pooled one with a lower
    # similarity (the pool is sorted), else, when every pooled one is nearer, the row.
    at = (top_s[:, None, :] >= s_ap[:, :, None]).sum(axis=2)  # B x P
    in_pool = pos_ok & (at < k)
    bi, pj = np.nonzero(in_pool)
    semi[bi, pj] = top[bi, at[bi, pj]]
    sim = np.full((B, P), -np.inf, dtype=np.float32)
    sim[bi, pj] = top_s[bi, at[bi, pj]]
    full_rows = 0
    for i, j in zip(*np.nonzero(pos_ok & ~in_pool)):
        full_rows += 1
        row = full_row(X, labels, anchors[i], None if S is None else S[i])
        row = np.where(row < s_ap[i, j], row, -np.inf)
        col = int(np.argmax(row))
        if np.isfinite(row[col]):
            semi[i, j], sim[i, j] = col, row[col]
    found = semi >= 0
    d_ap = 1.0 - s_ap
    semi_d[found] = 1.0 - sim[found]
    fallback[found] = ~(semi_d[found] < d_ap[found] + margin)
    return semi, semi_d, fallback, top[:, :hard_k], d_ap, full_rows


def mine_all(X, labels, index, anchors, positives, flat):
    N = X.shape[0]
    k = min(ARGS.pool, N - 1)
    if flat is not None:
        # faiss blocks and threads the search itself (OpenMP over --threads).
        block = 4096
    else:
        block = max(1, min(256, ARGS.block_floats // N))
    spans = [(s, min(s + block, len(anchors))) for s in range(0, len(anchors), block)]

    def job(span):
        s, e = span
        a, p = anchors[s:e], positives[s:e]
        if flat is not None:
            top, top_s, S = pools_faiss(flat, X, labels, index, a, k)
        else:
            top, top_s, S = pools_numpy(X, labels, index, a, k)
        return choose(X, labels, a, p, top, top_s, S, ARGS.margin, ARGS.hard_k)

    if flat is None and ARGS.mode == "rows" and ARGS.threads > 1:
        with ThreadPoolExecutor(ARGS.threads) as ex:
            parts = list(ex.map(job, spans))
    else:
        parts = [job(sp) for sp in spans]
    cat = lambda i: np.concatenate([p[i] for p in parts])  # noqa: E731
    return cat(0), cat(1), cat(2), cat(3), cat(4), sum(p[5] for p in parts)


def agreement(X, anchors, positives, semi, fallback, hard, d_ap):
    """How likeness's choices compare with the exact ones."""
    lk_semi = load("likeness_semi.npy", required=False)
    lk_fb = load("likeness_fallback.npy", required=False)
    lk_hard = load("likeness_hard.npy", required=False)
    out = {}
    if lk_semi is not None:
        has = (lk_semi >= 0) & (positives >= 0)
        a_rows = np.broadcast_to(anchors[:, None], lk_semi.shape)[has]
        n_rows = lk_semi[has]
        d_an = 1.0 - np.einsum("nd,nd->n", X[a_rows], X[n_rows])
        dap = d_ap[has]
        inside = (d_an > dap) & (d_an < dap + ARGS.margin)
        lk_window = lk_fb[has] == 0
        ex_window = fallback[has] == 0
        out["triplets_compared"] = int(has.sum())
        out["likeness_in_window"] = int(lk_window.sum())
        # Condition precision: likeness's semi-hard (non-fallback) negatives that meet
        # d_ap < d_an < d_ap + margin under exact distances.
        out["condition_precision"] = float(inside[lk_window].mean()) if lk_window.any() else None
        # The same negative as the exact miner's (the nearest inside the window).
        out["same_as_exact"] = float((n_rows == semi[has]).mean())
        # Where the exact miner found a window negative, likeness did too.
        both = ex_window
        out["window_recall"] = float(lk_window[both].mean()) if both.any() else None
        out["exact_in_window"] = int(ex_window.sum())
        # Exact d_an of likeness's pick minus the exact pick's, over window triplets.
        ex_d = 1.0 - np.einsum("nd,nd->n", X[a_rows], X[np.maximum(semi[has], 0)])
        gap = (d_an - ex_d)[lk_window & ex_window]
        out["median_extra_distance"] = float(np.median(gap)) if len(gap) else None
        out["p99_extra_distance"] = float(np.percentile(gap, 99)) if len(gap) else None
    if lk_hard is not None:
        k = min(lk_hard.shape[1], hard.shape[1])
        hits = 0
        for i in range(len(anchors)):
            hits += len(np.intersect1d(lk_hard[i, :k][lk_hard[i, :k] >= 0], hard[i, :k]))
        out["hard_overlap"] = hits / (len(anchors) * k)
        out["hard_k"] = k
    return out


def main():
    X = load("vectors.npy").astype(np.float32, copy=False)
    labels = load("labels.npy")
    anchors = load("anchors.npy").astype(np.int64)
    positives = load("positives.npy").astype(np.int64)
    index = LabelIndex(labels)
    flat = None
    if ARGS.engine == "faiss":
        import faiss

        faiss.omp_set_num_threads(ARGS.threads)
        flat = faiss.IndexFlatIP(X.shape[1])
        flat.add(X)
    mine_all(X, labels, index, anchors[:64], positives[:64], flat)  # warm-up
    # Each run times one positive per anchor (the Miner's default), then all of them.
    # CPU time of the process (every thread) as well: on a shared machine it is the
    # steadier figure.
    rates, rates_all, cpu_us = [], [], []
    result = None
    for _ in range(max(1, ARGS.runs)):
        t, c = time.perf_counter(), time.process_time()
        mine_all(X, labels, index, anchors, positives[:, :1], flat)
        rates.append(len(anchors) / (time.perf_counter() - t))
        cpu_us.append((time.process_time() - c) * 1e6 / len(anchors))
        t = time.perf_counter()
        result = mine_all(X, labels, index, anchors, positives, flat)
        rates_all.append(len(anchors) / (time.perf_counter() - t))
    semi, semi_d, fallback, hard, d_ap, full_rows = result
    has = positives >= 0
    report = {
        "n": int(X.shape[0]),
        "anchors": int(len(anchors)),
        "positives_per_anchor": int(positives.shape[1]),
        "threads": ARGS.threads,
        "engine": ARGS.engine,
        "mode": ARGS.mode if ARGS.engine == "numpy" else "faiss-omp",
        "anchors_per_second": rates,
        "median_anchors_per_second": float(np.median(rates)),
        "anchors_per_second_all_positives": rates_all,
        "cpu_us_per_anchor": cpu_us,
        "exact_fallback_share": float(fallback[has & (semi >= 0)].mean()),
        "full_row_searches": int(full_rows),
        "numpy": np.__version__,
    }
    report.update(agreement(X, anchors, positives, semi, fallback, hard, d_ap))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
