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
