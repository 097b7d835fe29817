"""Shared helpers for the fmnist-triplet embedder: data loading, the
network, the query perturbation used for re-identification tests and the
metrics.  Kept dependency-light (numpy + torch) on purpose."""

import gzip
import os
import struct

import numpy as np

DATA_DIR = os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist")
TRAIN_CLASSES = (0, 1, 2, 3, 4, 5)
HELDOUT_CLASSES = (6, 7, 8, 9)
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
EMBED_DIM = 64


# --------------------------------------------------------------------------
# IDX reading
# --------------------------------------------------------------------------
def _open_maybe_gz(path):
    if os.path.exists(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head == b"\x1f\x8b":
            return gzip.open(path, "rb")
        return open(path, "rb")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rb")
    raise FileNotFoundError(path)


def read_idx(path):
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
              0x0D: ">f4", 0x0E: ">f8"}
    with _open_maybe_gz(path) as fh:
        raw = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in dtypes:
        raise ValueError(f"{path}: not an IDX file")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: size mismatch")
    return data.reshape(dims).astype(np.dtype(dtypes[dtype_code]).newbyteorder("="))


def load_split(split):
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(DATA_DIR, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(os.path.join(DATA_DIR, f"{prefix}-labels-idx1-ubyte"))
    return images.astype(np.uint8), labels.astype(np.int64)


# --------------------------------------------------------------------------
# Preprocessing (outside the ONNX graph)
# --------------------------------------------------------------------------
def preprocess(images_u8, mean, std):
    """uint8 [N,28,28] -> float32 [N,1,28,28]: pixel/255 then (x-mean)/std."""
    x = images_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(mean)) / np.float32(std)
    return x[:, None, :, :].astype(np.float32)


# --------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------
def build_model(width=32, dim=EMBED_DIM):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class Embedder(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.features = nn.Sequential(
                block(1, w),                 # 28x28
                nn.MaxPool2d(2),             # 14x14
                block(w, 2 * w),
                nn.MaxPool2d(2),             # 7x7
                block(2 * w, 4 * w),
                block(4 * w, 4 * w),
            )
            self.head = nn.Linear(4 * w, dim)

        def forward(self, x):
            h = self.features(x)
            h = h.mean(dim=(2, 3))           # global average pooling
            e = self.head(h)
            # L2 normalisation is part of the exported graph.
            norm = torch.sqrt((e * e).sum(dim=1, keepdim=True)).clamp_min(1e-12)
            return e / norm

    return Embedder()


# --------------------------------------------------------------------------
# Re-identification perturbation (numpy, deterministic given an rng)
# --------------------------------------------------------------------------
def _bilinear_affine(img, angle_deg, scale, tx, ty):
    """Rotate/scale about the image centre, then shift by (tx, ty) pixels.
    Inverse mapping with bilinear interpolation, zero (black) outside."""
    h, w = img.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    a = np.deg2rad(angle_deg)
    ca, sa = np.cos(a), np.sin(a)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float64),
                         np.arange(w, dtype=np.float64), indexing="ij")
    # output -> input: undo shift, undo rotation, undo scale
    u = xx - cx - tx
    v = yy - cy - ty
    src_x = (ca * u + sa * v) / scale + cx
    src_y = (-sa * u + ca * v) / scale + cy
    x0 = np.floor(src_x).astype(np.int64)
    y0 = np.floor(src_y).astype(np.int64)
    fx = src_x - x0
    fy = src_y - y0
    src = img.astype(np.float64)

    def fetch(yi, xi):
        ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        out = np.zeros_like(src_x)
        out[ok] = src[yi[ok], xi[ok]]
        return out

    top = fetch(y0, x0) * (1 - fx) + fetch(y0, x0 + 1) * fx
    bot = fetch(y0 + 1, x0) * (1 - fx) + fetch(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bot * fy


def reid_perturb(images_u8, seed):
    """Per image: rotation U(-15,15) deg, scale U(0.9,1.1), shift U(-3,3) px
    on each axis, brightness x U(0.6,1.4) clipped to 0..255, then one 8x8
    black square at a uniformly random position fully inside the image."""
    rng = np.random.default_rng(seed)
    out = np.empty_like(images_u8)
    params = []
    for i, img in enumerate(images_u8):
        angle = rng.uniform(-15.0, 15.0)
        scale = rng.uniform(0.9, 1.1)
        tx, ty = rng.uniform(-3.0, 3.0, size=2)
        bright = rng.uniform(0.6, 1.4)
        sy, sx = rng.integers(0, 28 - 8 + 1, size=2)
        warped = _bilinear_affine(img, angle, scale, tx, ty)
        warped = np.clip(np.rint(warped * bright), 0, 255).astype(np.uint8)
        warped[sy:sy + 8, sx:sx + 8] = 0
        out[i] = warped
        params.append((angle, scale, tx, ty, bright, int(sy), int(sx)))
    return out, params


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------
def l2n(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_distance_matrix(q, e):
    return 1.0 - l2n(q) @ l2n(e).T


def recall_at_1(q, q_labels, e, e_labels):
    d = cosine_distance_matrix(q, e)
    nn_idx = np.argmin(d, axis=1)
    return float(np.mean(e_labels[nn_idx] == q_labels))


def pair_distances(q, e, pairs):
    qn, en = l2n(q), l2n(e)
    return 1.0 - np.sum(qn[pairs[:, 0]] * en[pairs[:, 1]], axis=1)


def best_threshold(dist, same):
    """Threshold t (predict 'same' when dist <= t) maximising accuracy.
    Returns (t, accuracy).  t is the midpoint between neighbouring sorted
    distances so it is robust to tiny numerical differences."""
    order = np.argsort(dist, kind="stable")
    d = dist[order]
    s = same[order].astype(np.int64)
    n = len(d)
    n_diff = n - s.sum()
    # accept the first k pairs (k = 0..n)
    tp = np.concatenate([[0], np.cumsum(s)])
    fp = np.concatenate([[0], np.cumsum(1 - s)])
    correct = tp + (n_diff - fp)
    # only cut between distinct distances
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = d[1:] > d[:-1]
    correct = np.where(valid, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        t = d[0] - 1e-6
    elif k == n:
        t = d[-1] + 1e-6
    else:
        t = 0.5 * (d[k - 1] + d[k])
    return float(t), float(correct[k] / n)


def accuracy_at(dist, same, t):
    return float(np.mean((dist <= t) == same.astype(bool)))


def roc_auc(dist, same):
    """AUC of the score -dist for 'same' (Mann-Whitney with tie handling)."""
    score = -np.asarray(dist, dtype=np.float64)
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    i = 0
    while i < len(score):
        j = i
        while j + 1 < len(score) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    pos = same.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dbl_log_likelihood(dist, same, m):
    """Mean log-likelihood of p(match) = (1+exp(-m)) / (1+exp(D-m))."""
    d = np.asarray(dist, dtype=np.float64)
    log_p = np.logaddexp(0.0, -m) - np.logaddexp(0.0, d - m)
    log_p = np.minimum(log_p, 0.0)
    p = np.exp(log_p)
    log_q = np.log(np.clip(1.0 - p, 1e-300, None))
    return float(np.mean(np.where(same.astype(bool), log_p, log_q)))


def fit_dbl_margin(dist, same, lo=-10.0, hi=10.0):
    """1-D search for m: coarse grid, then golden-section refinement.

    Note: d logp/dm = sigmoid(D-m) - sigmoid(-m) > 0 for D > 0, and as
    m -> -inf the model tends to p = exp(-D).  With cosine distances
    (D <= 2) the likelihood is often maximised at m -> -inf; the search is
    bounded at `lo` (at m = -10, p is within ~5e-5 of exp(-D)) and the
    caller is told when the optimum sits on the edge."""
    grid = np.linspace(lo, hi, 2001)
    ll = np.array([dbl_log_likelihood(dist, same, m) for m in grid])
    k = int(np.argmax(ll))
    a = grid[max(k - 1, 0)]
    b = grid[min(k + 1, len(grid) - 1)]
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(60):
        if dbl_log_likelihood(dist, same, c) > dbl_log_likelihood(dist, same, d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    m = 0.5 * (a + b)
    at_edge = k == 0 or k == len(grid) - 1
    return float(m), dbl_log_likelihood(dist, same, m), bool(at_edge)


# --------------------------------------------------------------------------
# Pair model (fmnist-pair) helpers, used by train_pair.py and
# evaluate_pair.py.  Nothing above depends on them.
# --------------------------------------------------------------------------
NORM_MEAN = 0.2844   # the embedder's preprocessing constants (train_meta.json)
NORM_STD = 0.3542

# Validation set for the pair model: TEST split, classes 0-5 (seen classes,
# unseen images).  Seeds differ from the held-out protocol in evaluate.py.
PAIR_VAL_SEEDS = {"split": 20250711, "reid": 20250712, "pairs": 20250713}


def split_enrol_query(labels, classes, per_class, seed):
    """Per class in `classes`: `per_class` enrol and `per_class` other query
    indices into `labels`, drawn without replacement."""
    rng = np.random.default_rng(seed)
    enrol, query = [], []
    for c in classes:
        perm = rng.permutation(np.flatnonzero(labels == c))
        enrol.append(np.sort(perm[:per_class]))
        query.append(np.sort(perm[per_class:2 * per_class]))
    return np.concatenate(enrol), np.concatenate(query)


def balanced_pairs(q_labels, e_labels, n_pairs, seed):
    """int64 [n_pairs,3] (query index, enrol index, same): half same-class,
    half different-class, no pair twice, rows shuffled."""
    rng = np.random.default_rng(seed)
    taken = set()
    rows = []
    for same in (1, 0):
        while len(rows) < (n_pairs // 2) * (2 - same):
            q = int(rng.integers(len(q_labels)))
            ok = (e_labels == q_labels[q]) if same else (e_labels != q_labels[q])
            cands = np.flatnonzero(ok)
            e = int(cands[rng.integers(len(cands))])
            if (q, e) not in taken:
                taken.add((q, e))
                rows.append((q, e, same))
    rows = np.array(rows, dtype=np.int64)
    return rows[rng.permutation(len(rows))]


def pair_validation_set(per_class=100, n_pairs=3000, seeds=PAIR_VAL_SEEDS):
    """Enrol / clean query / re-id query images and balanced pairs from the
    TEST split of the training classes 0-5, built like the held-out fixtures
    (same re-id perturbation, different seeds)."""
    images, labels = load_split("test")
    e_idx, q_idx = split_enrol_query(labels, TRAIN_CLASSES, per_class, seeds["split"])
    query = images[q_idx]
    reid, _ = reid_perturb(query, seeds["reid"])
    return {
        "enrol_images": images[e_idx], "enrol_labels": labels[e_idx],
        "query_clean_images": query, "query_reid_images": reid,
        "query_labels": labels[q_idx],
        "pairs": balanced_pairs(labels[q_idx], labels[e_idx], n_pairs, seeds["pairs"]),
    }


def score_best_threshold(score, same):
    """Threshold t on a similarity score (predict 'same' when score >= t)
    maximising accuracy; midpoint between neighbouring scores."""
    t, acc = best_threshold(-np.asarray(score, dtype=np.float64), same)
    return -t, acc


def score_accuracy_at(score, same, t):
    return float(np.mean((np.asarray(score) >= t) == np.asarray(same).astype(bool)))


def score_roc_auc(score, same):
    return roc_auc(-np.asarray(score, dtype=np.float64), same)


def rerank_candidates(dist, r_max):
    """Per query row of `dist`: the r_max enrolled indices with the smallest
    distance, nearest first (stable on ties)."""
    order = np.argsort(dist, axis=1, kind="stable")[:, :r_max]
    return order, np.take_along_axis(dist, order, axis=1)


def rerank_recall_at_1(cand, cand_dist, cand_score, q_labels, e_labels, r):
    """Keep the first r candidates per query (nearest first), re-order them
    by pair score descending (ties: smaller distance first) and return the
    fraction of queries whose new top item has the query's label."""
    hits = 0
    for i in range(len(cand)):
        c, d, s = cand[i, :r], cand_dist[i, :r], cand_score[i, :r]
        top = c[np.lexsort((d, -s))[0]]
        hits += int(e_labels[top] == q_labels[i])
    return hits / len(cand)


def pair_model_figures(score_fn, embed_fn, data, threshold=None, r_values=(5, 10, 20)):
    """Verification and re-ranking figures of a pair model on one data set
    (dict as returned by pair_validation_set, or the held-out fixtures).

    score_fn(a_u8, b_u8) -> float [N] pair scores (a = query, b = enrolled);
    embed_fn(u8) -> [N,D] embedder output, used to pick the candidates.
    `threshold` (score >= t means same): if given, accuracy at it is
    reported as well.  Returns (figures, raw) where raw holds the scores."""
    pairs = np.asarray(data["pairs"])
    same = pairs[:, 2].astype(bool)
    enrol, e_lab, q_lab = data["enrol_images"], data["enrol_labels"], data["query_labels"]
    emb_e = embed_fn(enrol)
    figures, raw = {}, {}
    for kind in ("clean", "reid"):
        query = data[f"query_{kind}_images"]
        score = np.asarray(score_fn(query[pairs[:, 0]], enrol[pairs[:, 1]]), dtype=np.float64)
        t_best, acc_best = score_best_threshold(score, same)
        f = {"best_accuracy": acc_best, "best_threshold": t_best,
             "roc_auc": score_roc_auc(score, same)}
        if threshold is not None:
            f["accuracy_at_threshold"] = score_accuracy_at(score, same, threshold)
        emb_q = embed_fn(query)
        dist = cosine_distance_matrix(emb_q, emb_e)
        r_max = max(r_values)
        cand, cand_dist = rerank_candidates(dist, r_max)
        q_rep = np.repeat(np.arange(len(query)), r_max)
        cand_score = np.asarray(score_fn(query[q_rep], enrol[cand.reshape(-1)]),
                                dtype=np.float64).reshape(cand.shape)
        f["embedder_recall_at_1"] = float(np.mean(e_lab[cand[:, 0]] == q_lab))
        f["rerank_recall_at_1"] = {
            str(r): rerank_recall_at_1(cand, cand_dist, cand_score, q_lab, e_lab, r)
            for r in r_values}
        figures[kind] = f
        raw[kind] = {"pair_scores": score, "cand": cand, "cand_dist": cand_dist,
                     "cand_score": cand_score}
    return figures, raw
