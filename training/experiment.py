#!/usr/bin/env python3
"""What mining buys: one small CNN, one step budget, six ways to pick its examples.

Methods (the same network, optimiser, schedule, augmentation, step budget and about
96 images per step for each):

  siamese            contrastive loss on random pairs (half same class)
  triplet-random     triplet loss, random positive and negative per anchor
  triplet-inbatch    triplet loss, semi-hard triplets mined inside each P x K batch
                     by pytorch-metric-learning's TripletMarginMiner
  likeness-semihard  triplet loss, SEMI_HARD triplets mined by likeness over the
                     whole training collection (MineTriplets)
  likeness-margin    margin loss (Wu et al. 2017), DISTANCE_WEIGHTED negatives mined
                     by likeness
  likeness-dbl       distance-based logistic loss (Vo & Hays 2016) on SEMI_HARD pairs
                     mined by likeness (MinePairs)

For the likeness methods the trainer embeds every training image with its current
weights and upserts the vectors (generation = step) before step 0 and every
--refresh steps; the daemon mines from the collection as it stands, the trainer
embeds the mined ids' images afresh and applies the loss. Refreshing and waiting for
the stream are counted in the method's wall time.

Evaluation on classes never trained on, as training/MODEL_CARD.md: identification
recall@1 against an enrolled gallery, verification accuracy at the best threshold on
the same pairs (and ROC AUC), with clean and perturbed (re-id) queries, beside cosine
kNN on raw pixels. The embeddings come from the torch module (not an ONNX export).

  python3 experiment.py --benchmark fmnist --seeds 0 1 2 3 4 --out results/fmnist.json
  python3 experiment.py --report results/fmnist.json results/glyphs.json

--report writes docs/experiment-<result file's name>.png.

Runs merge into --out, keyed by (method, seed), so a benchmark may be run in pieces.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import fmnist_common as fc  # noqa: E402

ROUND1 = ("siamese", "triplet-random", "triplet-inbatch",
          "likeness-semihard", "likeness-margin", "likeness-dbl")
# Round two (issue 17): P x K batches with an in-batch semi-hard miner, plus a memory of
# negatives beyond the batch kept in-process (xbm) or in the daemon's collection.
# likeness-batches-activate: likeness-batches' batches and loss, but the daemon keeps the
# collection's vectors: the trainer publishes each version of its network (ONNX) and
# activates it on the collection of training images, and trains on while the daemon
# re-embeds them.
ROUND2 = ("xbm", "likeness-batches", "likeness-memory", "likeness-batches-memory",
          "likeness-batches-activate")
METHODS = ROUND1 + ROUND2
LIKENESS_METHODS = ("likeness-semihard", "likeness-margin", "likeness-dbl",
                    "likeness-batches", "likeness-memory", "likeness-batches-memory",
                    "likeness-batches-activate")
MEMORY_METHODS = ("xbm", "likeness-memory", "likeness-batches-memory")
NEIGHBOUR_METHODS = ("likeness-batches", "likeness-batches-memory", "likeness-batches-activate")
ACTIVATE_METHODS = ("likeness-batches-activate",)
PK_METHODS = ("triplet-inbatch",) + ROUND2
DEFAULT_METHODS = {
    "fmnist": ROUND1, "glyphs": ROUND1,
    "cjk": ("triplet-inbatch", "xbm", "likeness-batches", "likeness-memory",
            "likeness-batches-memory", "likeness-semihard", "likeness-batches-activate"),
}
TRIPLET_MARGIN = 0.2

# --------------------------------------------------------------------------
# Benchmarks: uint8 [N,28,28] training images with int labels, a validation
# set for the learning curves and a test protocol, all on unseen classes.
# --------------------------------------------------------------------------


def _enrol_query(labels, classes, per_class, rng):
    enrol, query = [], []
    for c in classes:
        perm = rng.permutation(np.flatnonzero(labels == c))
        enrol.append(np.sort(perm[:per_class]))
        query.append(np.sort(perm[per_class:2 * per_class]))
    return np.concatenate(enrol), np.concatenate(query)


def fmnist_benchmark(train_per_class):
    """Training: classes 0-5 of the TRAIN split (train_per_class each, seeded).
    Test: the model card's protocol exactly (TEST split, classes 6-9, its seeds).
    Validation (curves only): classes 6-9 of the TRAIN split, never trained on."""
    import evaluate as ev
    images, labels = fc.load_split("train")
    rng = np.random.default_rng(20260101)
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:train_per_class]
                           for c in fc.TRAIN_CLASSES])
    v_e, v_q = _enrol_query(labels, fc.HELDOUT_CLASSES, 50, rng)
    t_img, t_lab = fc.load_split("test")
    e_idx, q_idx = ev.select_split(t_lab, 100, 20240601)
    query = t_img[q_idx]
    reid, _ = fc.reid_perturb(query, 20240602)
    pairs = ev.make_pairs(t_lab[q_idx], t_lab[e_idx], 2000, 20240603)
    return {
        "name": "fmnist",
        "train_images": images[pick], "train_labels": labels[pick],
        "val": {"enrol": images[v_e], "enrol_labels": labels[v_e],
                "query": images[v_q], "query_labels": labels[v_q]},
        "test": {"enrol": t_img[e_idx], "enrol_labels": t_lab[e_idx],
                 "query": query, "reid": reid, "query_labels": t_lab[q_idx],
                 "pairs": pairs},
        "describe": {"train_classes": list(fc.TRAIN_CLASSES),
                     "unseen_classes": list(fc.HELDOUT_CLASSES),
                     "train_images": int(len(pick)),
                     "test": "model card protocol: 400 enrol, 400 queries, 2000 pairs"},
    }


def glyph_benchmark(train_per_class, per_class=10):
    """Training: train characters in train fonts (up to train_per_class fonts each).
    Test: per unseen character, per_class enrolled and per_class query glyphs from
    held-out fonts; validation: per_class / 2 more of each, other fonts again."""
    import glyphs
    d = glyphs.load()
    rng = np.random.default_rng(20260102)
    tr = np.flatnonzero(d["train_mask"])
    pick = np.concatenate([rng.permutation(tr[d["labels"][tr] == c])[:train_per_class]
                           for c in d["train_chars"]])
    un = np.flatnonzero(d["unseen_mask"])
    need = 3 * per_class
    classes = [c for c in np.unique(d["labels"][un]) if (d["labels"][un] == c).sum() >= need]
    enrol, query, v_e, v_q = [], [], [], []
    for c in classes:
        perm = rng.permutation(un[d["labels"][un] == c])
        enrol.append(perm[:per_class])
        query.append(perm[per_class:2 * per_class])
        h = per_class // 2
        v_e.append(perm[2 * per_class:2 * per_class + h])
        v_q.append(perm[2 * per_class + h:3 * per_class])
    enrol, query = np.concatenate(enrol), np.concatenate(query)
    v_e, v_q = np.concatenate(v_e), np.concatenate(v_q)
    img, lab = d["images"], d["labels"]
    q_img = img[query]
    reid, _ = fc.reid_perturb(q_img, 20260103)
    pairs = fc.balanced_pairs(lab[query], lab[enrol], 2000, 20260104)
    info = glyphs.summary(d)
    info.update({"train_images": int(len(pick)), "unseen_classes_tested": len(classes),
                 "train_chars": "".join(str(d["chars"][c]) for c in d["train_chars"]),
                 "unseen_chars": "".join(str(d["chars"][c]) for c in classes),
                 "test": f"{per_class} enrol + {per_class} queries per unseen character, "
                         "held-out fonts; 2000 pairs"})
    return {
        "name": "glyphs",
        "train_images": img[pick], "train_labels": lab[pick],
        "val": {"enrol": img[v_e], "enrol_labels": lab[v_e],
                "query": img[v_q], "query_labels": lab[v_q]},
        "test": {"enrol": img[enrol], "enrol_labels": lab[enrol], "query": q_img,
                 "reid": reid, "query_labels": lab[query], "pairs": pairs},
        "describe": info,
    }


def cjk_benchmark(train_per_class=0, per_class=5):
    """Training: train characters in train fonts (all of them, or up to train_per_class
    fonts each). Test: per test character (unseen), per_class enrolled and per_class
    query glyphs from held-out fonts; validation: the same on the other unseen
    characters (learning curves, and the verification threshold that the test uses)."""
    import cjk
    d = cjk.load()
    img, lab = d["images"], d["labels"]
    rng = np.random.default_rng(20260105)
    tr = np.flatnonzero(d["train_mask"])
    if train_per_class:
        tr = np.concatenate([rng.permutation(tr[lab[tr] == c])[:train_per_class]
                             for c in np.unique(lab[tr])])
    tr = np.sort(tr)

    def protocol(mask, seed):
        idx = np.flatnonzero(mask)
        enrol, query = [], []
        for c in np.unique(lab[idx]):
            perm = rng.permutation(idx[lab[idx] == c])
            if len(perm) < 2 * per_class:
                continue
            enrol.append(np.sort(perm[:per_class]))
            query.append(np.sort(perm[per_class:2 * per_class]))
        enrol, query = np.concatenate(enrol), np.concatenate(query)
        reid, _ = fc.reid_perturb(img[query], seed)
        pairs = fc.balanced_pairs(lab[query], lab[enrol], 4000, seed + 1)
        return {"enrol": img[enrol], "enrol_labels": lab[enrol], "query": img[query],
                "reid": reid, "query_labels": lab[query], "pairs": pairs}

    test = protocol(d["test_mask"], 20260106)
    val = protocol(d["val_mask"], 20260108)
    info = cjk.summary(d)
    info.update({"train_images": int(len(tr)),
                 "test_classes_tested": int(len(np.unique(test["query_labels"]))),
                 "val_classes_tested": int(len(np.unique(val["query_labels"]))),
                 "test": f"{per_class} enrol + {per_class} queries per test character, "
                         "held-out fonts; 4000 balanced pairs; the verification "
                         "threshold is chosen on the validation characters' pairs"})
    return {"name": "cjk", "train_images": img[tr], "train_labels": lab[tr],
            "val": val, "test": test, "describe": info}


# --------------------------------------------------------------------------
# Metrics (the model card's: fmnist_common's recall@1, best threshold, AUC)
# --------------------------------------------------------------------------


def protocol_metrics(embed, test, val=None):
    """embed: uint8 [n,28,28] -> [n,d]. Clean and re-id figures. When `val` carries
    its own pairs (and re-id queries), the verification threshold is also chosen there
    and applied to the test pairs ("verification_accuracy_val_threshold")."""
    e = embed(test["enrol"])
    pairs = test["pairs"]
    same = pairs[:, 2].astype(bool)
    use_val = val is not None and "pairs" in val and "reid" in val
    if use_val:
        ve = embed(val["enrol"])
        vsame = val["pairs"][:, 2].astype(bool)
    out = {}
    for kind in ("clean", "reid"):
        q = embed(test["query"] if kind == "clean" else test["reid"])
        dist = fc.pair_distances(q, e, pairs)
        _, acc = fc.best_threshold(dist, same)
        out[kind] = {"recall_at_1": fc.recall_at_1(q, test["query_labels"], e,
                                                   test["enrol_labels"]),
                     "verification_accuracy": acc,
                     "roc_auc": fc.roc_auc(dist, same)}
        if use_val:
            vq = embed(val["query"] if kind == "clean" else val["reid"])
            t, _ = fc.best_threshold(fc.pair_distances(vq, ve, val["pairs"]), vsame)
            out[kind]["threshold"] = float(t)
            out[kind]["verification_accuracy_val_threshold"] = float(
                np.mean((dist <= t) == same))
    return out


def pixels(u8):
    return u8.reshape(len(u8), -1).astype(np.float64) / 255.0


# --------------------------------------------------------------------------
# The daemon (methods 4-6): started here unless --address names one
# --------------------------------------------------------------------------


class Daemon:
    """`likeness serve` on 127.0.0.1:0 with a temporary data dir; its address is read
    from the JSON "listening" log line."""

    def __init__(self, binary):
        self.dir = tempfile.mkdtemp(prefix="likeness-exp-")
        env = dict(os.environ, LIKENESS_METRICS_LISTEN="127.0.0.1:0")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.dir,
             "--log-format", "json", "--log", "warn,likeness=info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=env)
        self.address = None
        self.tail = []
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.tail = (self.tail + [line.rstrip()])[-20:]
                if self.address is None:
                    try:
                        fields = json.loads(line).get("fields", {})
                    except ValueError:
                        continue
                    if fields.get("message") == "listening":
                        self.address = fields["addr"]
                        ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(60) or self.address is None:
            self.stop()
            raise RuntimeError("likeness did not start:\n" + "\n".join(self.tail))

    def cpu_seconds(self):
        """User + system CPU time of the daemon so far (Linux /proc)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as fh:
                f = fh.read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def default_binary():
    given = os.environ.get("LIKENESS_BIN")
    if given:
        return given
    built = [os.path.join(ROOT, "target", p, "likeness") for p in ("release", "debug")]
    built = [b for b in built if os.path.isfile(b)]
    return built[0] if built else "likeness"


# --------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------


class DBLLoss:
    """Distance-based logistic loss (Vo & Hays 2016) on labelled pairs:
    p(match) = (1 + e^-m) / (1 + e^(s D - m)), binary cross-entropy against `same`.
    The paper's D is an unnormalised feature distance with s = 1; our embeddings are
    unit-norm (D <= 2), where p could never fall near 0, so the scale s is learnt
    beside m (both are trainable parameters, initialised at s = 4, m = 2)."""

    def __init__(self):
        import torch
        self.m = torch.nn.Parameter(torch.tensor(2.0))
        self.log_s = torch.nn.Parameter(torch.tensor(float(np.log(4.0))))

    def parameters(self):
        return [self.m, self.log_s]

    def __call__(self, d, same):
        import torch.nn.functional as F
        z = self.log_s.exp() * d
        log_p = F.softplus(-self.m) - F.softplus(z - self.m)
        # 1 - p = e^-m (e^z - 1) / (1 + e^(z - m)), in log space
        log_q = -self.m + (z.clamp_min(1e-6).expm1()).log() - F.softplus(z - self.m)
        return -(same * log_p + (~same) * log_q).mean()


def contrastive_loss(d, same, neg_margin=1.0):
    """Hadsell et al.: y D^2 + (1 - y) max(0, m - D)^2, mean over pairs."""
    import torch
    return torch.where(same, d * d, (neg_margin - d).clamp_min(0) ** 2).mean()


def euclid(a, b):
    return ((a - b) ** 2).sum(dim=1).clamp_min(1e-12).sqrt()


def pairwise_l2(a, b):
    """Euclidean distances [len(a), len(b)] with a finite gradient at 0."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * a @ b.t()
    return d2.clamp_min(1e-12).sqrt()


def semihard_ref_loss(emb, labels, ref_emb, ref_labels, margin=TRIPLET_MARGIN,
                      exclude=None):
    """Triplet loss of the batch's fresh embeddings against a set of reference vectors
    (a cross-batch memory, or the stored vectors the daemon returned): the mean of
    d_ap - d_an + margin over every semi-hard triplet (d_ap < d_an <= d_ap + margin)
    whose anchor is a row of `emb` and whose positive and negative are rows of
    `ref_emb` (detached: no gradient reaches the memory). `exclude`: an optional bool
    [len(emb), len(ref_emb)] of pairs to leave out (an anchor's own stored copy).

    The same figure as pytorch-metric-learning's TripletMarginMiner("semihard") plus
    TripletMarginLoss with ref_emb (tested against it), but without the
    [batch, memory, memory] triplet mask that those build: per anchor, the negatives'
    distances are sorted once and each positive's window is two binary searches in
    them, so a memory of 100k vectors costs one matrix product and a sort per step.
    Returns (loss, number of semi-hard triplets)."""
    import torch
    import torch.nn.functional as F
    emb = F.normalize(emb, dim=1)  # as pml's LpDistance does
    ref = F.normalize(ref_emb.detach(), dim=1)
    d = pairwise_l2(emb, ref)
    same = labels[:, None] == ref_labels[None, :]
    if exclude is not None:
        same_pos = same & ~exclude
        neg = ~same & ~exclude
    else:
        same_pos, neg = same, ~same
    inf = torch.tensor(float("inf"), dtype=d.dtype)
    s_neg, _ = torch.sort(torch.where(neg, d, inf), dim=1)
    finite = torch.isfinite(s_neg)
    csum = torch.cat([torch.zeros(len(d), 1, dtype=d.dtype),
                      torch.cumsum(torch.where(finite, s_neg, torch.zeros_like(s_neg)), 1)], 1)
    npos = same_pos.sum(1)
    width = int(npos.max()) if len(npos) else 0
    if width == 0:
        return emb.sum() * 0.0, 0
    order = torch.argsort(same_pos.to(torch.int8), dim=1, descending=True,
                          stable=True)[:, :width]
    valid = torch.arange(width)[None, :] < npos[:, None]
    d_ap = d.gather(1, order)
    key = s_neg.detach().contiguous()
    lo = torch.searchsorted(key, d_ap.detach().contiguous(), right=True)
    hi = torch.searchsorted(key, (d_ap + margin).detach().contiguous(), right=True)
    count = (hi - lo).clamp_min(0) * valid
    sum_an = csum.gather(1, hi) - csum.gather(1, lo)
    total = (count * (d_ap + margin) - torch.where(valid, sum_an, torch.zeros_like(sum_an))).sum()
    n = int(count.sum())
    if n == 0:
        return emb.sum() * 0.0, 0
    return total / n, n


class MemoryQueue:
    """XBM's memory (Wang et al. 2020), as pytorch-metric-learning's CrossBatchMemory
    keeps it: a ring of the last `size` detached embeddings with their labels (and
    here their item ids, so that an anchor's own older copy can be left out)."""

    def __init__(self, size, dim):
        import torch
        self.emb = torch.zeros(size, dim)
        self.labels = torch.zeros(size, dtype=torch.int64)
        self.ids = np.full(size, -1, dtype=np.int64)
        self.size, self.ptr, self.filled = size, 0, 0

    def add(self, emb, labels, ids):
        n = len(ids)
        pos = (self.ptr + np.arange(n)) % self.size
        self.emb[pos] = emb.detach()
        self.labels[pos] = labels
        self.ids[pos] = ids
        self.ptr = int((self.ptr + n) % self.size)
        self.filled = min(self.size, self.filled + n)

    def get(self):
        k = self.filled
        return self.emb[:k], self.labels[:k], self.ids[:k]


def class_separation(e, labels):
    """Mean over the batch's classes of the distance from a class's centroid to the
    nearest other class's centroid (smaller: the batch's classes are harder for each
    other)."""
    import torch
    with torch.no_grad():
        cls = torch.unique(labels)
        if len(cls) < 2:
            return float("nan")
        cent = torch.stack([e[labels == c].mean(0) for c in cls])
        cent = cent / cent.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = pairwise_l2(cent, cent)
        d.fill_diagonal_(float("inf"))
        return float(d.min(1).values.mean())


# --------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------


class Run:
    """Trains one method for `steps` steps with one seed and evaluates it."""

    def __init__(self, bench, method, seed, args, client=None, daemon=None, log=print):
        import torch
        self.torch = torch
        self.bench, self.method, self.seed, self.args = bench, method, seed, args
        self.client, self.daemon, self.log = client, daemon, log
        self.x_u8 = bench["train_images"]
        self.y = np.asarray(bench["train_labels"], dtype=np.int64)
        x01 = self.x_u8.astype(np.float64) / 255.0
        self.mean, self.std = float(x01.mean()), float(x01.std())
        self.x = torch.from_numpy(self.x_u8.astype(np.float32) / 255.0).unsqueeze(1)
        self.classes = np.unique(self.y)
        self.by_class = {int(c): np.flatnonzero(self.y == c) for c in self.classes}
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.model = fc.build_model(width=args.width)
        params = list(self.model.parameters())
        self.dbl = DBLLoss() if method == "likeness-dbl" else None
        groups = [{"params": params}]
        if self.dbl is not None:
            groups.append({"params": self.dbl.parameters(), "weight_decay": 0.0})
        self.opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.15,
            anneal_strategy="cos")
        from pytorch_metric_learning import losses, miners
        self.triplet = losses.TripletMarginLoss(margin=TRIPLET_MARGIN)
        self.margin_loss = losses.MarginLoss(margin=0.2, beta=1.2)
        self.miner = miners.TripletMarginMiner(margin=TRIPLET_MARGIN,
                                               type_of_triplets="semihard")
        self.collection = None
        self.stream_iter = None
        self.pass_no = 0
        self.mined = {"triplets": 0, "pairs": 0, "label_violations": 0}
        # round two: warm-up before a memory is used, its age bound, the batch streams
        self.step_no = 0
        self.warmup = args.warmup if args.warmup >= 0 else args.steps // 5
        self.max_age = max(1, args.memory // args.batch)
        self.queue = MemoryQueue(args.memory, fc.EMBED_DIM) if method == "xbm" else None
        self.cmem = None
        self.nb_ds = self.nb_iter = None
        self.nb_epoch = 0
        self.r2 = {"memory_triplets": 0, "memory_refs": 0, "memory_steps": 0,
                   "memory_seconds": 0.0, "writeback_seconds": 0.0, "batch_seconds": 0.0,
                   "separation": [], "separation_steps": [], "separation_random": [],
                   "neighbour_batches": 0,
                   "example_batch": None}
        probe_rng = np.random.default_rng(1234)
        self.probe = np.sort(probe_rng.choice(len(self.y), min(512, len(self.y)), replace=False))
        self.probe_prev = None
        # likeness-batches-activate: the daemon re-embeds the collection (see start_model)
        self.act = None
        self.eval_s = 0.0
        self.tag = os.getpid()  # in the collection's and model's names

    def collection_name(self):
        return f"{self.bench['name']}-{self.method}-{self.seed}-{self.tag}"

    # ---- hooks that distributed.py's ranks override (one process: no-ops)
    def create_training_collection(self):
        """Round two: the collection the batches' embeddings are written back to."""
        self.collection = self.collection_name()
        self.client.create_collection(self.collection, fc.EMBED_DIM, "l2")

    def drop_training_collection(self):
        self.client.delete_collection(self.collection)

    def memory_add(self, emb, labels, idx):
        """XBM: the batch's detached embeddings into the queue."""
        self.queue.add(emb, labels, idx)

    def activate_version(self, version):
        self.client.activate(self.collection, self.act["model"], version)

    # ---- images -> embeddings
    def forward(self, idx, train=True):
        import train as tr
        xb = self.x[self.torch.as_tensor(idx)]
        if train and self.args.aug_prob > 0:
            xb = tr.augment(xb, self.gen, self.args.aug_prob)
        return self.model((xb - self.mean) / self.std)

    def embed_u8(self, u8):
        torch = self.torch
        self.model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(u8), 1024):
                xb = torch.from_numpy(u8[i:i + 1024].astype(np.float32) / 255.0).unsqueeze(1)
                out.append(self.model((xb - self.mean) / self.std).numpy())
        self.model.train()
        return np.concatenate(out)

    # ---- the collection (likeness methods)
    def refresh(self, step):
        vectors = self.embed_u8(self.x_u8)
        ids = [str(i) for i in range(len(self.y))]
        labels = [str(int(v)) for v in self.y]
        if self.collection is None:
            self.collection = self.collection_name()
            self.client.create_collection(self.collection, vectors.shape[1], "l2")
        self.client.upsert(self.collection, ids, vectors, labels=labels, generation=step,
                           batch_size=4096)

    def start_memory(self):
        """The Session behind likeness-memory: SEMI_HARD positives and negatives of the
        batch's fresh embeddings among the stored vectors, no older than max_age steps,
        and the batch written back every step."""
        from likeness.torch import CollectionMemory
        self.cmem = CollectionMemory(
            self.client, self.collection, "semi_hard", margin=TRIPLET_MARGIN,
            negatives_per_anchor=self.args.memory_negatives, positives_per_anchor=1,
            min_generation=max(0, self.step_no - self.max_age), seed=self.seed)

    def neighbour_batch(self):
        """The next MineBatches batch (NeighbourClassBatches over the collection)."""
        from likeness.torch import NeighbourClassBatches
        t = time.perf_counter()
        for _ in range(3):
            if self.nb_iter is None:
                P = min(len(self.classes), self.args.pk_classes)
                self.nb_ds = NeighbourClassBatches(
                    self.client.address, self.collection, classes=P,
                    per_class=self.args.batch // P,
                    neighbours=(self.args.neighbours if self.args.neighbours is not None
                                else (P - 1) // 2),
                    seed=self.seed * 1000)
                self.nb_ds.set_epoch(self.nb_epoch)
                self.nb_epoch += 1
                self.nb_iter = iter(self.nb_ds)
            try:
                b = next(self.nb_iter)
                break
            except StopIteration:
                self.nb_iter = None
        else:
            raise RuntimeError("MineBatches returned nothing")
        self.r2["batch_seconds"] += time.perf_counter() - t
        self.r2["neighbour_batches"] += 1
        idx = np.array([int(i) for i in b.ids], dtype=np.int64)
        names = [b.label_names[int(c)] for c in b.labels]
        self.mined["label_violations"] += int(sum(str(int(self.y[i])) != n
                                                  for i, n in zip(idx, names)))
        if self.r2["example_batch"] is None and self.step_no >= self.args.steps // 2:
            self.r2["example_batch"] = {
                "step": self.step_no, "ids": idx.tolist(), "classes": list(b.classes),
                "neighbours": int(b.neighbours),
                "class_distances": [float(x) for x in b.class_distances]}
        return idx

    # ---- likeness-batches-activate: the daemon keeps the collection's vectors
    def start_model(self):
        """Publishes the untrained network as version 0, creates the training collection
        bound to it (ids and labels as the other likeness methods') and enrols the
        training images as PNG inputs, in a background thread: the daemon embeds them on
        ingest while the warm-up trains on random P x K batches."""
        from concurrent.futures import ThreadPoolExecutor
        import onnx_release
        name = self.collection_name()
        self.collection = name
        self.act = {"model": name, "dir": tempfile.mkdtemp(prefix="likeness-act-"),
                    "next_version": 0, "pending": None, "activated": 0, "last_poll": 0.0,
                    "pool": ThreadPoolExecutor(1), "enrol": None, "check_model": None,
                    "log": {"export_seconds": 0.0, "publish_seconds": 0.0,
                            "activate_call_seconds": 0.0, "wait_seconds": 0.0,
                            "poll_seconds": 0.0, "polls": 0, "enrol_seconds": None,
                            "enrol_wait_seconds": 0.0, "activations": [],
                            "first_neighbour_step": None, "check_max_abs_diff": None}}
        self.publish_version()
        self.client.create_collection(name, model=f"{name}@0")
        ids = [str(i) for i in range(len(self.y))]
        labels = [str(int(v)) for v in self.y]

        def enrol():
            t = time.perf_counter()
            inputs = [onnx_release.png(a) for a in self.x_u8]
            self.client.upsert(name, ids, inputs=inputs, labels=labels, batch_size=500)
            return time.perf_counter() - t

        self.act["enrol"] = self.act["pool"].submit(enrol)

    def publish_version(self):
        """Exports the network as it is (eval mode) to ONNX + model.toml and publishes
        it as the model's next version; returns the version."""
        import onnx_release
        a, log = self.act, self.act["log"]
        version = str(a["next_version"])
        t = time.perf_counter()
        manifest = onnx_release.export(self.model, a["dir"], a["model"], version,
                                       self.mean, self.std)
        t1 = time.perf_counter()
        self.client.publish(a["model"], manifest)
        log["publish_seconds"] += time.perf_counter() - t1
        log["export_seconds"] += t1 - t
        if version == "1":  # checked once against the daemon's vectors (poll_activation)
            import copy
            a["check_model"] = copy.deepcopy(self.model).eval()
        a["next_version"] += 1
        return version

    def start_activation(self, step):
        """At the end of the warm-up and every --refresh steps: publish the network and
        activate it on the training collection. Returns at once; the daemon re-embeds
        the stored images while training goes on (poll_activation). A previous
        activation still running, or the enrolment, is waited for first."""
        a, log = self.act, self.act["log"]
        if a["enrol"] is not None:
            t = time.perf_counter()
            log["enrol_seconds"] = a["enrol"].result()  # re-raises the thread's error
            log["enrol_wait_seconds"] = time.perf_counter() - t
            a["enrol"] = None
        if a["pending"] is not None:
            t = time.perf_counter()
            self.poll_activation(step, block=True)
            log["wait_seconds"] += time.perf_counter() - t
        version = self.publish_version()
        t = time.perf_counter()
        self.activate_version(version)
        now = time.perf_counter()
        log["activate_call_seconds"] += now - t
        a["pending"] = {"version": version, "step": step, "t0": t, "eval0": self.eval_s}
        a["last_poll"] = now

    def poll_activation(self, step, block=False):
        """Whether the pending activation is done (at most every 0.25 s unless `block`,
        which waits for it). When it is, the batch stream is reopened, so that the
        batches from here on are mined from the new version's vectors."""
        a, log = self.act, self.act["log"]
        p = a["pending"]
        now = time.perf_counter()
        if p is None or (not block and now - a["last_poll"] < 0.25):
            return
        a["last_poll"] = now
        if block:
            info = self.client.wait_activation(self.collection, timeout=3600, poll=0.05)
        else:
            info = self.client.get_collection(self.collection)
            log["polls"] += 1
            log["poll_seconds"] += time.perf_counter() - now
        act = info.activation
        if act is None or act.version != p["version"]:
            raise RuntimeError(f"{self.collection}: activation {act} is not version "
                               f"{p['version']}'s")
        if act.state == "failed":
            raise RuntimeError(f"{self.collection}: activation failed: {act.error}")
        if act.state != "done":
            return
        done = time.perf_counter()
        log["activations"].append({
            "version": p["version"], "step": p["step"], "done_step": step,
            "steps_during": step - p["step"], "wall_seconds": done - p["t0"],
            "eval_seconds_during": self.eval_s - p["eval0"], "blocked": block,
            "items": int(act.total), "daemon_rate": float(act.rate), "finished": True})
        a["pending"] = None
        a["activated"] += 1
        if log["first_neighbour_step"] is None and step >= self.warmup:
            log["first_neighbour_step"] = step
        if a["check_model"] is not None and act.version == "1":
            log["check_max_abs_diff"] = self.check_vectors(a["check_model"])
            a["check_model"] = None
        if self.nb_iter is not None:  # batches of the new vectors from the next one on
            getattr(self.nb_iter, "close", lambda: None)()
            self.nb_iter = None

    def check_vectors(self, model):
        """Largest difference between the daemon's stored vectors of 16 training images
        and what the published network (`model`, a copy in eval mode) makes of them."""
        torch = self.torch
        idx = self.probe[:16]
        got = self.client.get(self.collection, [str(int(i)) for i in idx],
                              with_vectors=True).vectors
        with torch.no_grad():
            want = model((self.x[torch.as_tensor(idx)] - self.mean) / self.std).numpy()
        return float(np.abs(np.asarray(got) - want).max())

    def end_model(self):
        """After the last step: an activation still running is left unfinished (its
        progress recorded); the export folder goes."""
        a, log = self.act, self.act["log"]
        p = a["pending"]
        if p is not None:
            info = self.client.get_collection(self.collection)
            act = info.activation
            log["activations"].append({
                "version": p["version"], "step": p["step"], "done_step": None,
                "steps_during": self.args.steps - p["step"],
                "wall_seconds": time.perf_counter() - p["t0"],
                "eval_seconds_during": self.eval_s - p["eval0"], "blocked": False,
                "items": int(act.total) if act else None,
                "items_done": int(act.done) if act else None,
                "daemon_rate": float(act.rate) if act else None, "finished": False})
            a["pending"] = None
        if a["enrol"] is not None:
            log["enrol_seconds"] = a["enrol"].result()
        a["pool"].shutdown()
        shutil.rmtree(a["dir"], ignore_errors=True)
        acts = log["activations"]
        log["versions"] = a["next_version"]
        log["steps_during_activations"] = int(sum(x["steps_during"] for x in acts))
        log["activation_seconds"] = float(sum(x["wall_seconds"] for x in acts))
        return log

    def pk_batch(self):
        P = min(len(self.classes), self.args.pk_classes)
        K = self.args.batch // P
        cls = self.rng.choice(self.classes, P, replace=False)
        return np.concatenate([self.rng.choice(self.by_class[int(c)], K,
                                               replace=len(self.by_class[int(c)]) < K)
                               for c in cls])

    def round_two_loss(self):
        """In-batch semi-hard triplet loss over a P x K batch (random classes, or
        classes the daemon chose as neighbours), plus, after the warm-up, the same loss
        of the batch's fresh embeddings against a memory: XBM's in-process queue, or
        the stored vectors the daemon's Session returned."""
        torch, m, step = self.torch, self.method, self.step_no
        neighbours = m in NEIGHBOUR_METHODS and step >= self.warmup
        if m in ACTIVATE_METHODS:  # random batches until the first activation is done
            neighbours = neighbours and self.act["activated"] > 0
        idx = self.neighbour_batch() if neighbours else self.pk_batch()
        e = self.forward(idx)
        labels = torch.from_numpy(self.y[idx])
        trip = self.miner(e, labels)
        self.mined["triplets"] += int(len(trip[0]))
        loss = self.triplet(e, labels, trip)
        if step % 10 == 0:
            self.r2["separation"].append(class_separation(e.detach(), labels))
            self.r2["separation_steps"].append(step)
            if neighbours:  # a random batch under the same weights, for comparison
                with torch.no_grad():
                    j = self.pk_batch()
                    self.r2["separation_random"].append(class_separation(
                        self.forward(j), torch.from_numpy(self.y[j])))
        w = self.args.memory_weight
        if m == "xbm":
            t = time.perf_counter()
            if step >= self.warmup and self.queue.filled:
                r_e, r_y, r_id = self.queue.get()
                excl = torch.from_numpy(idx[:, None] == r_id[None, :])
                extra, n = semihard_ref_loss(e, labels, r_e, r_y, exclude=excl)
                loss = loss + w * extra
                self.r2["memory_triplets"] += n
                self.r2["memory_refs"] += len(r_id)
                self.r2["memory_steps"] += 1
            self.memory_add(e.detach(), labels, idx)
            self.r2["memory_seconds"] += time.perf_counter() - t
        elif m in ("likeness-memory", "likeness-batches-memory") and step < self.warmup:
            # The warm-up fills the memory by plain upserts: a Session cannot start on a
            # collection with fewer than two labels, so it cannot fill an empty one by
            # its own write-back.
            t = time.perf_counter()
            self.client.upsert(self.collection, [str(int(i)) for i in idx],
                               e.detach().numpy(), labels=[str(int(v)) for v in self.y[idx]],
                               generation=step)
            self.r2["writeback_seconds"] += time.perf_counter() - t
        elif m in ("likeness-memory", "likeness-batches-memory"):
            t = time.perf_counter()
            if self.cmem is None:
                self.start_memory()
            if step % 10 == 0:
                self.cmem.update(min_generation=max(0, step - self.max_age))
            names = [str(int(v)) for v in self.y[idx]]
            r = self.cmem.step([str(int(i)) for i in idx], e, names, step)
            if len(r):
                ref_idx = np.array([int(i) for i in r.ref_ids], dtype=np.int64)
                r_y = torch.from_numpy(self.y[ref_idx])
                self.mined["label_violations"] += int(sum(
                    r.label_names[int(c)] != str(int(self.y[i]))
                    for c, i in zip(r.ref_labels, ref_idx)))
                excl = torch.from_numpy(idx[:, None] == ref_idx[None, :])
                extra, n = semihard_ref_loss(e, labels, r.ref_emb, r_y, exclude=excl)
                loss = loss + w * extra
                self.r2["memory_triplets"] += n
                self.r2["memory_refs"] += len(ref_idx)
                self.r2["memory_steps"] += 1
            self.r2["memory_seconds"] += time.perf_counter() - t
        elif m == "likeness-batches":  # keep the batch's items fresh between refreshes
            t = time.perf_counter()
            self.client.upsert(self.collection, [str(int(i)) for i in idx],
                               e.detach().numpy(), labels=[str(int(v)) for v in self.y[idx]],
                               generation=step)
            self.r2["writeback_seconds"] += time.perf_counter() - t
        return loss

    def _new_stream(self):
        opts = dict(batch_size=self.args.anchors, positives_per_anchor=1,
                    negatives_per_anchor=1, seed=self.seed * 1000 + self.pass_no)
        self.pass_no += 1
        if self.method == "likeness-semihard":
            s = self.client.mine_triplets(self.collection, "semi_hard", margin=TRIPLET_MARGIN,
                                          **opts)
        elif self.method == "likeness-margin":
            s = self.client.mine_triplets(self.collection, "distance_weighted", **opts)
        else:
            s = self.client.mine_pairs(self.collection, "semi_hard", margin=TRIPLET_MARGIN,
                                       **opts)
        self.stream = s
        return iter(s)

    def next_mined(self):
        for _ in range(3):
            if self.stream_iter is None:
                self.stream_iter = self._new_stream()
            try:
                b = next(self.stream_iter)
                if len(b):
                    return b
            except StopIteration:
                self.stream_iter = None
        raise RuntimeError("the miner returned nothing")

    # ---- one step's loss
    def step_loss(self):
        torch = self.torch
        m, rng, B = self.method, self.rng, self.args.batch
        if m in PK_METHODS:
            return self.round_two_loss()
        if m == "siamese":
            n = B // 2
            a = rng.integers(len(self.y), size=n)
            same = np.arange(n) < n // 2
            b = np.array([self._other(a[i], same[i]) for i in range(n)])
            e = self.forward(np.concatenate([a, b]))
            d = euclid(e[:n], e[n:])
            return contrastive_loss(d, torch.from_numpy(same))
        if m == "triplet-random":
            n = B // 3
            a = rng.integers(len(self.y), size=n)
            p = np.array([self._other(i, True) for i in a])
            q = np.array([self._other(i, False) for i in a])
            e = self.forward(np.concatenate([a, p, q]))
            r = torch.arange(n)
            labels = torch.from_numpy(self.y[np.concatenate([a, p, q])])
            return self.triplet(e, labels, (r, r + n, r + 2 * n))
        # likeness: ids of the whole collection's mined examples
        b = self.next_mined()
        if m == "likeness-dbl":
            ids = [int(i) for i in b.a_ids + b.b_ids]
            uniq, inv = np.unique(ids, return_inverse=True)
            e = self.forward(uniq)
            k = len(b.a_ids)
            ia, ib = torch.from_numpy(inv[:k]), torch.from_numpy(inv[k:])
            same = torch.from_numpy(b.same.copy())
            ok = (self.y[uniq][inv[:k]] == self.y[uniq][inv[k:]]) == b.same
            self.mined["pairs"] += k
            self.mined["label_violations"] += int((~ok).sum())
            return self.dbl(euclid(e[ia], e[ib]), same)
        ids = [int(i) for i in b.anchor_ids + b.positive_ids + b.negative_ids]
        uniq, inv = np.unique(ids, return_inverse=True)
        k = len(b.anchor_ids)
        e = self.forward(uniq)
        ya = self.y[uniq][inv[:k]]
        yp = self.y[uniq][inv[k:2 * k]]
        yn = self.y[uniq][inv[2 * k:]]
        self.mined["triplets"] += k
        self.mined["label_violations"] += int(((ya != yp) | (ya == yn)).sum())
        labels = torch.from_numpy(self.y[uniq])
        trip = tuple(torch.from_numpy(inv[j * k:(j + 1) * k]) for j in range(3))
        loss_fn = self.triplet if m == "likeness-semihard" else self.margin_loss
        return loss_fn(e, labels, trip)

    def _other(self, i, same):
        y = self.y[i]
        if same:
            pool = self.by_class[int(y)]
            while True:
                j = pool[self.rng.integers(len(pool))]
                if j != i or len(pool) == 1:
                    return j
        while True:
            j = self.rng.integers(len(self.y))
            if self.y[j] != y:
                return j

    def val_recall(self):
        v = self.bench["val"]
        q = self.embed_u8(v["query"])
        e = self.embed_u8(v["enrol"])
        return fc.recall_at_1(q, v["query_labels"], e, v["enrol_labels"])

    def train(self):
        try:
            return self._train()
        except BaseException:
            # An open MineBatches iterator left to the interpreter's exit can hang it
            # (seen after the daemon stopped); likeness-batches-activate's thread and
            # export folder go too.
            if self.nb_iter is not None:
                getattr(self.nb_iter, "close", lambda: None)()
                self.nb_iter = None
            if self.act is not None:
                self.act["pool"].shutdown(wait=False, cancel_futures=True)
                shutil.rmtree(self.act["dir"], ignore_errors=True)
            raise

    def _train(self):
        torch, args = self.torch, self.args
        uses_daemon = self.method in LIKENESS_METHODS
        curve = {"step": [], "loss": [], "val_step": [], "val_recall_at_1": []}
        wall = refresh_s = 0.0
        self.eval_s = 0.0
        cpu0 = time.process_time()
        d_cpu0 = self.daemon.cpu_seconds() if (uses_daemon and self.daemon) else None
        t = time.perf_counter()
        periodic = uses_daemon and self.method in ROUND1
        activate = self.method in ACTIVATE_METHODS
        if periodic:
            self.refresh(0)
            refresh_s += time.perf_counter() - t
        elif activate:  # version 0 published, the images enrolled while the warm-up runs
            self.start_model()
            refresh_s += time.perf_counter() - t
        elif uses_daemon:  # round two: the collection fills by write-back from step 0
            self.create_training_collection()
        # Neighbour batches need every training item's vector: a full refresh at the end
        # of the warm-up (random P x K batches until then) and every --refresh steps after.
        # likeness-batches-activate: at the same steps the daemon re-embeds the stored
        # images with the published network, while the trainer goes on training.
        nb_refresh = self.method in NEIGHBOUR_METHODS and not activate
        curve["drift_step"], curve["drift"] = [], []
        self.model.train()
        for step in range(args.steps):
            self.step_no = step
            if nb_refresh and step >= self.warmup and (step - self.warmup) % args.refresh == 0:
                t_r = time.perf_counter()
                self.refresh(step)
                self.nb_iter = None  # batches from here on see the refreshed vectors
                refresh_s += time.perf_counter() - t_r
            if periodic and step > 0 and step % args.refresh == 0:
                t_r = time.perf_counter()
                self.refresh(step)
                refresh_s += time.perf_counter() - t_r
            if activate:
                t_r = time.perf_counter()
                if step >= self.warmup and (step - self.warmup) % args.refresh == 0:
                    self.start_activation(step)
                else:
                    self.poll_activation(step)
                refresh_s += time.perf_counter() - t_r
            loss = self.step_loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            lv = float(loss.detach())
            curve["step"].append(step)
            curve["loss"].append(round(lv, 5))
            if not np.isfinite(lv):
                raise FloatingPointError(f"{self.method}: loss {lv} at step {step}")
            if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
                t_e = time.perf_counter()
                wall += t_e - t
                curve["val_step"].append(step + 1)
                curve["val_recall_at_1"].append(self.val_recall())
                pe = self.embed_u8(self.x_u8[self.probe])
                if self.probe_prev is not None:
                    curve["drift_step"].append(step + 1)
                    curve["drift"].append(float(np.linalg.norm(pe - self.probe_prev,
                                                               axis=1).mean()))
                self.probe_prev = pe
                t = time.perf_counter()
                self.eval_s += t - t_e
        latency = None
        if self.cmem is not None:
            latency = self.cmem.latency_summary()
            self.cmem.close()
        act_log = self.end_model() if activate else None
        wall += time.perf_counter() - t
        if uses_daemon and self.stream_iter is not None:
            self.stream.cancel()
        self.nb_iter = None  # ends the MineBatches stream (its generator closes it)
        cpu = time.process_time() - cpu0
        info = {"wall_seconds": wall, "refresh_seconds": refresh_s,
                "val_eval_seconds": self.eval_s, "trainer_cpu_seconds": cpu,
                "mined": dict(self.mined)}
        if act_log is not None:
            info["activate"] = act_log
        if self.method in PK_METHODS:
            r2 = dict(self.r2)
            sep = np.asarray(r2.pop("separation"), dtype=np.float64)
            sep_steps = np.asarray(r2.pop("separation_steps"))
            first_nb = self.warmup
            if activate:  # random batches until the first activation was done
                first_nb = act_log["first_neighbour_step"]
                first_nb = args.steps if first_nb is None else first_nb
            after = sep[sep_steps >= first_nb]
            r2["separation_mean"] = float(np.nanmean(after)) if len(after) else None
            rnd = r2.pop("separation_random")
            r2["separation_random_mean"] = float(np.nanmean(rnd)) if rnd else None
            curve["separation"] = [round(float(v), 4) for v in sep]
            r2["warmup"], r2["max_age_steps"] = self.warmup, self.max_age
            r2["memory_latency"] = latency
            info["round2"] = r2
        if d_cpu0 is not None:
            info["daemon_cpu_seconds"] = self.daemon.cpu_seconds() - d_cpu0
        if self.dbl is not None:
            info["dbl"] = {"m": float(self.dbl.m.detach()), "s": float(self.dbl.log_s.detach().exp())}
        if uses_daemon and self.collection:
            self.drop_training_collection()
        return curve, info

    def evaluate(self):
        return protocol_metrics(self.embed_u8, self.bench["test"], self.bench.get("val"))


# --------------------------------------------------------------------------
# Reporting: table and plots from result files
# --------------------------------------------------------------------------


def aggregate(result):
    rows = {}
    for key, r in result["runs"].items():
        rows.setdefault(r["method"], []).append(r)
    out = {}
    for m in METHODS:
        if m not in rows:
            continue
        rs = rows[m]

        def stat(get):
            v = np.array([get(r) for r in rs], dtype=np.float64)
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

        out[m] = {"seeds": sorted(r["seed"] for r in rs)}
        for kind in ("clean", "reid"):
            for metric in ("recall_at_1", "verification_accuracy", "roc_auc"):
                out[m][f"{metric}_{kind}"] = stat(lambda r: r["test"][kind][metric])
        out[m]["wall_seconds"] = stat(lambda r: r["info"]["wall_seconds"])
        out[m]["refresh_seconds"] = stat(lambda r: r["info"]["refresh_seconds"])
        out[m]["daemon_cpu_seconds"] = stat(lambda r: r["info"].get("daemon_cpu_seconds", 0.0))
        out[m]["trainer_cpu_seconds"] = stat(lambda r: r["info"]["trainer_cpu_seconds"])
    return out


def table(result):
    agg = aggregate(result)
    cols = [("recall_at_1_clean", "R@1 clean"), ("recall_at_1_reid", "R@1 re-id"),
            ("verification_accuracy_clean", "verif. clean"),
            ("verification_accuracy_reid", "verif. re-id"),
            ("roc_auc_clean", "AUC clean"), ("roc_auc_reid", "AUC re-id")]
    lines = ["| method | " + " | ".join(c[1] for c in cols)
             + " | wall s/run (refresh) | CPU s/run, trainer + daemon |",
             "|---" * (len(cols) + 3) + "|"]
    for m, a in agg.items():
        cells = [f"{a[k][0]:.3f} ± {a[k][1]:.3f}" for k, _ in cols]
        w, r = a["wall_seconds"], a["refresh_seconds"]
        extra = f" ({r[0]:.0f})" if r[0] > 0 else ""
        tc, dc = a["trainer_cpu_seconds"][0], a["daemon_cpu_seconds"][0]
        lines.append(f"| {m} (n={len(a['seeds'])}) | " + " | ".join(cells)
                     + f" | {w[0]:.0f} ± {w[1]:.0f}{extra} | {tc:.0f} + {dc:.0f} |")
    px = result["pixels"]
    cells = [f"{px[k.rsplit('_', 1)[1]][k.rsplit('_', 1)[0]]:.3f}" for k, _ in cols]
    lines.append("| raw pixels, cosine | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)


def method_colours(plt):
    """A colour per method, the same in every report: matplotlib's default cycle (ten
    colours) in METHODS' order, then others for the methods beyond ten."""
    cycle = list(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    return dict(zip(METHODS, cycle + ["#000080", "#b8860b", "#2f4f4f"]))


def plot(result, path):
    """Per method, the mean over seeds (band: min to max) of the smoothed training loss
    (divided by its first value, since the losses differ in scale) and of the
    validation recall@1 on unseen classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drift = any(r["curve"].get("drift") for r in result["runs"].values())
    if drift:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 4.5))
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = method_colours(plt)
    runs = {}
    for r in result["runs"].values():
        runs.setdefault(r["method"], []).append(r["curve"])
    for m in METHODS:
        if m not in runs:
            continue
        curves = runs[m]
        w = 20
        rel = []
        for c in curves:
            loss = np.asarray(c["loss"], dtype=np.float64)
            smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
            rel.append(smooth / max(smooth[0], 1e-9))
        rel = np.stack(rel)
        x = np.arange(rel.shape[1]) + w - 1
        ax1.plot(x, rel.mean(0), color=colours[m], label=m)
        ax1.fill_between(x, rel.min(0), rel.max(0), color=colours[m], alpha=0.15)
        val = np.array([c["val_recall_at_1"] for c in curves])
        vx = curves[0]["val_step"]
        ax2.plot(vx, val.mean(0), color=colours[m], marker="o", ms=3, label=m)
        ax2.fill_between(vx, val.min(0), val.max(0), color=colours[m], alpha=0.12)
        if drift and curves[0].get("drift"):
            dr = np.array([c["drift"] for c in curves])
            ax3.plot(curves[0]["drift_step"], dr.mean(0), color=colours[m], marker="o",
                     ms=3, label=m)
    ax2.axhline(result["pixels_val_recall_at_1"], color="k", ls="--", lw=1,
                label="raw pixels")
    n = len(next(iter(runs.values())))
    ax1.set(title=f"{result['benchmark']}: training loss / its first value "
                  f"(moving mean of {w}; {n} seeds)", xlabel="step", ylabel="relative loss")
    ax2.set(title=f"{result['benchmark']}: validation recall@1, unseen classes (clean)",
            xlabel="step", ylabel="recall@1")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    if drift:
        ax3.set(title="drift of 512 fixed training images: mean distance moved since "
                      "the previous point", xlabel="step", ylabel="L2 distance")
        ax3.title.set_fontsize(9)
        ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Round two's report: mean ± standard error, differences against the baselines
R2_COLS = [("recall_at_1_clean", "R@1 clean"), ("recall_at_1_reid", "R@1 re-id"),
           ("verification_accuracy_val_threshold_clean", "verif. clean (val thr.)"),
           ("verification_accuracy_val_threshold_reid", "verif. re-id (val thr.)"),
           ("roc_auc_clean", "AUC clean"), ("roc_auc_reid", "AUC re-id")]


def _figure(r, key):
    metric, kind = key.rsplit("_", 1)
    if metric == "val_recall_at_1_last":
        return r["curve"]["val_recall_at_1"][-1]
    return r["test"][kind][metric]


def per_method(result):
    rows = {}
    for r in result["runs"].values():
        rows.setdefault(r["method"], []).append(r)
    order = [m for m in METHODS if m in rows] + [m for m in rows if m not in METHODS]
    return {m: sorted(rows[m], key=lambda r: r["seed"]) for m in order}


def mean_se(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0)


def table_round2(result):
    """Mean ± standard error over seeds, with costs."""
    rows = per_method(result)
    lines = ["| method | " + " | ".join(c[1] for c in R2_COLS)
             + " | wall s/run (refresh) | CPU s/run, trainer + daemon |",
             "|---" * (len(R2_COLS) + 3) + "|"]
    for m, rs in rows.items():
        cells = []
        for key, _ in R2_COLS:
            mu, se = mean_se([_figure(r, key) for r in rs])
            cells.append(f"{mu:.3f} ± {se:.3f}")
        w = mean_se([r["info"]["wall_seconds"] for r in rs])
        ref = np.mean([r["info"]["refresh_seconds"] for r in rs])
        tc = np.mean([r["info"]["trainer_cpu_seconds"] for r in rs])
        dc = np.mean([r["info"].get("daemon_cpu_seconds", 0.0) for r in rs])
        extra = f" ({ref:.0f})" if ref > 0 else ""
        lines.append(f"| {m} (n={len(rs)}) | " + " | ".join(cells)
                     + f" | {w[0]:.0f} ± {w[1]:.0f}{extra} | {tc:.0f} + {dc:.0f} |")
    px = result["pixels"]
    cells = []
    for key, _ in R2_COLS:
        metric, kind = key.rsplit("_", 1)
        cells.append(f"{px[kind][metric]:.3f}")
    lines.append("| raw pixels, cosine | " + " | ".join(cells) + " | - | - |")
    return "\n".join(lines)


def differences(result, baselines=("triplet-inbatch", "xbm"), methods=None):
    """Per method (all, or those in `methods`) and baseline: the difference of the
    means and its standard error (sqrt(se1^2 + se2^2), the seeds being independent
    runs), and whether it exceeds two standard errors."""
    rows = per_method(result)
    lines = ["| method | vs | " + " | ".join(c[1] for c in R2_COLS[:2] + R2_COLS[4:5])
             + " |", "|---" * 5 + "|"]
    out = {}
    for base in baselines:
        if base not in rows:
            continue
        for m, rs in rows.items():
            if m == base or (methods is not None and m not in methods):
                continue
            cells = []
            for key, _ in R2_COLS[:2] + R2_COLS[4:5]:
                a = mean_se([_figure(r, key) for r in rs])
                b = mean_se([_figure(r, key) for r in rows[base]])
                diff, se = a[0] - b[0], float(np.hypot(a[1], b[1]))
                flag = " **" if se > 0 and abs(diff) > 2 * se else ""
                cells.append(f"{diff:+.3f} ± {se:.3f}{flag}")
                out[(m, base, key)] = (diff, se)
            lines.append(f"| {m} | {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines), out


def paired_differences(result, baselines=("triplet-inbatch", "xbm"), methods=None):
    """As differences(), but per seed (a seed gives every method the same initial
    weights): the mean of the per-seed differences and its standard error."""
    rows = per_method(result)
    keys = R2_COLS[:2] + R2_COLS[4:5]
    lines = ["| method | vs | seeds | " + " | ".join(c[1] for c in keys) + " |",
             "|---" * 6 + "|"]
    for base in baselines:
        if base not in rows:
            continue
        b = {r["seed"]: r for r in rows[base]}
        for m, rs in rows.items():
            if m == base or (methods is not None and m not in methods):
                continue
            pairs = [(r, b[r["seed"]]) for r in rs if r["seed"] in b]
            if len(pairs) < 2:
                continue
            cells = []
            for key, _ in keys:
                diff, se = mean_se([_figure(x, key) - _figure(y, key) for x, y in pairs])
                flag = " **" if se > 0 and abs(diff) > 2 * se else ""
                cells.append(f"{diff:+.3f} ± {se:.3f}{flag}")
            lines.append(f"| {m} | {base} | {len(pairs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def costs_round2(result):
    """Where the time goes, per method: mean seconds per run and per step."""
    rows = per_method(result)
    steps = result["settings"]["steps"]
    lines = ["| method | trainer CPU s | daemon CPU s | wall s | refresh s | memory term s "
             "| write-back s | batch stream s | Session p50 / p99 ms | in-batch triplets "
             "/ step | memory triplets / step | refs / step |", "|---" * 12 + "|"]
    for m, rs in rows.items():
        r2 = [r["info"].get("round2", {}) for r in rs]

        def avg(f):
            return float(np.mean([f(r, x) for r, x in zip(rs, r2)]))
        lat = [x.get("memory_latency") for x in r2 if x.get("memory_latency")]
        lat_s = (f"{np.mean([v['p50_ms'] for v in lat]):.0f} / "
                 f"{np.mean([v['p99_ms'] for v in lat]):.0f}") if lat else "-"
        msteps = avg(lambda r, x: max(1, x.get("memory_steps", 0)))
        lines.append(
            f"| {m} | {avg(lambda r, x: r['info']['trainer_cpu_seconds']):.0f} "
            f"| {avg(lambda r, x: r['info'].get('daemon_cpu_seconds', 0.0)):.0f} "
            f"| {avg(lambda r, x: r['info']['wall_seconds']):.0f} "
            f"| {avg(lambda r, x: r['info']['refresh_seconds']):.0f} "
            f"| {avg(lambda r, x: x.get('memory_seconds', 0.0)):.0f} "
            f"| {avg(lambda r, x: x.get('writeback_seconds', 0.0)):.0f} "
            f"| {avg(lambda r, x: x.get('batch_seconds', 0.0)):.0f} | {lat_s} "
            f"| {avg(lambda r, x: r['info']['mined']['triplets']) / steps:.0f} "
            f"| {avg(lambda r, x: x.get('memory_triplets', 0)) / msteps:.0f} "
            f"| {avg(lambda r, x: x.get('memory_refs', 0)) / msteps:.0f} |")
    return "\n".join(lines)


def activations_round2(result):
    """likeness-batches-activate: the versions it published and what their activations
    took (the daemon re-embedding the training images while the trainer went on with
    the previous version's batch stream). Means per run, or per activation where said;
    the last activation may still be running when training ends ("finished")."""
    rows = per_method(result)
    lines = ["| method | versions / run | export + publish s / version | activations "
             "finished / started | wall s / activation | daemon items/s | steps trained "
             "during an activation | steps trained during activations / run | trainer "
             "blocked s / run (enrolment wait, activation wait) | enrolment s "
             "(background) | first neighbour-batch step | daemon's vectors vs the "
             "network's, max abs diff |", "|---" * 13 + "|"]
    for m, rs in rows.items():
        logs = [r["info"].get("activate") for r in rs]
        if not all(logs):
            continue
        done = [x for lg in logs for x in lg["activations"] if x["finished"]]
        started = np.mean([len(lg["activations"]) for lg in logs])
        check = [lg["check_max_abs_diff"] for lg in logs
                 if lg["check_max_abs_diff"] is not None]

        def avg(f, of=logs):
            return float(np.mean([f(x) for x in of])) if of else float("nan")
        lines.append(
            f"| {m} | {avg(lambda lg: lg['versions']):.0f} "
            f"| {avg(lambda lg: (lg['export_seconds'] + lg['publish_seconds']) / lg['versions']):.2f} "
            f"| {len(done) / len(logs):.1f} / {started:.1f} "
            f"| {avg(lambda x: x['wall_seconds'], done):.1f} "
            f"| {avg(lambda x: x['daemon_rate'], done):.0f} "
            f"| {avg(lambda x: x['steps_during'], done):.0f} "
            f"| {avg(lambda lg: lg['steps_during_activations']):.0f} "
            f"| {np.mean([r['info']['refresh_seconds'] for r in rs]):.1f} "
            f"({avg(lambda lg: lg['enrol_wait_seconds']):.1f}, "
            f"{avg(lambda lg: lg['wait_seconds']):.1f}) "
            f"| {avg(lambda lg: lg['enrol_seconds'] or 0.0):.1f} "
            f"| {avg(lambda lg: lg['first_neighbour_step'] if lg['first_neighbour_step'] is not None else float('nan')):.0f} "
            f"| {max(check) if check else float('nan'):.1e} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def hardness_round2(result):
    """Class separation of the trained batches (after the warm-up): mean over steps of
    each class centroid's distance to the nearest other class centroid in the batch."""
    rows = per_method(result)
    lines = ["| method | separation of its batches | of random batches, same weights |",
             "|---|---|---|"]
    for m, rs in rows.items():
        sep = [r["info"].get("round2", {}).get("separation_mean") for r in rs]
        rnd = [r["info"].get("round2", {}).get("separation_random_mean") for r in rs]
        if any(v is None for v in sep):
            continue
        a = mean_se(sep)
        b = (f"{mean_se(rnd)[0]:.3f} ± {mean_se(rnd)[1]:.3f}"
             if all(v is not None for v in rnd) else "-")
        lines.append(f"| {m} | {a[0]:.3f} ± {a[1]:.3f} | {b} |")
    return "\n".join(lines)


def bars(result, path):
    """Final figures per method: mean over seeds, error bars one standard error."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = per_method(result)
    keys = [R2_COLS[0], R2_COLS[1], R2_COLS[2], R2_COLS[4]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 4.2))
    colours = method_colours(plt)
    names = list(rows)
    for ax, (key, title) in zip(axes, keys):
        ms = [mean_se([_figure(r, key) for r in rows[m]]) for m in names]
        ax.bar(range(len(names)), [v[0] for v in ms], yerr=[v[1] for v in ms],
               color=[colours[m] for m in names], capsize=3)
        lo = min(v[0] - v[1] for v in ms)
        hi = max(v[0] + v[1] for v in ms)
        ax.set_ylim(max(0.0, lo - (hi - lo) * 0.6 - 0.01), min(1.0, hi + (hi - lo) * 0.3 + 0.01))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    n = min(len(rows[m]) for m in names)
    fig.suptitle(f"{result['benchmark']}, {result['settings']['steps']} steps: mean of "
                 f"{n}+ seeds, bars one standard error", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def batch_picture(result, bench_images, path):
    """The neighbour-class batch that the first likeness-batches run kept (at half of
    its steps): a row per class, anchor class first, then its neighbours (with the
    daemon's class distance), then the random classes."""
    from PIL import Image, ImageDraw
    ex = None
    for m in NEIGHBOUR_METHODS:
        for r in per_method(result).get(m, []):
            ex = r["info"].get("round2", {}).get("example_batch")
            if ex:
                break
        if ex:
            break
    if not ex:
        return None
    ids = np.asarray(ex["ids"])
    y = result["_train_labels"]
    rows = []
    for c in ex["classes"]:
        mine = ids[y[ids] == int(c)]
        tiles = [bench_images[i] for i in mine]
        rows.append(np.concatenate(tiles, axis=1) if tiles else np.zeros((28, 28), np.uint8))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows]
    grid = np.concatenate(rows)
    scale = 2
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                       Image.Resampling.NEAREST)
    canvas = Image.new("L", (img.width + 190, img.height), 0)
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (c, dist) in enumerate(zip(ex["classes"], ex["class_distances"])):
        what = ("anchor class" if k == 0 else
                f"neighbour, d={dist:.3f}" if k <= ex["neighbours"] else "random")
        draw.text((img.width + 6, k * 30 * scale + 22), what, fill=255)
    canvas.save(path)
    return ex


def report_round2(res, stem, plots):
    print(table_round2(res))
    print()
    text, _ = differences(res)
    print(text)
    print()
    print(paired_differences(res))
    print()
    if any(m in per_method(res) for m in ACTIVATE_METHODS) and "likeness-batches" in per_method(res):
        text, _ = differences(res, ("likeness-batches",), methods=ACTIVATE_METHODS)
        print(text)
        print()
        print(paired_differences(res, ("likeness-batches",), methods=ACTIVATE_METHODS))
        print()
    print(costs_round2(res))
    print()
    acts = activations_round2(res)
    if acts:
        print(acts)
        print()
    print()
    print(hardness_round2(res))
    png = os.path.join(plots, f"experiment-{stem}.png")
    plot(res, png)
    bars_png = os.path.join(plots, f"experiment-{stem}-bars.png")
    bars(res, bars_png)
    print("\nwrote", png, bars_png)
    if res["benchmark"] == "cjk":
        d_args = parse_args(["--benchmark", "cjk"])
        bench = load_benchmark(d_args)
        res["_train_labels"] = np.asarray(bench["train_labels"])
        bp = os.path.join(plots, f"experiment-{stem}-batch.png")
        ex = batch_picture(res, bench["train_images"], bp)
        if ex:
            import cjk
            print("wrote", bp, "(step", ex["step"], "; classes:",
                  "".join(cjk.CHARS[int(c)] for c in ex["classes"]), "; neighbours:",
                  ex["neighbours"], ")")


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=["fmnist", "glyphs", "cjk"], default="fmnist")
    p.add_argument("--methods", default=None,
                   help="comma-separated, from: " + ", ".join(METHODS)
                   + " (default: the benchmark's round: " + "; ".join(
                       f"{b}: {','.join(m)}" for b, m in DEFAULT_METHODS.items()) + ")")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=96, help="images per step (about)")
    p.add_argument("--anchors", type=int, default=32,
                   help="anchors per mined message (likeness methods): 32 -> <= 96 images")
    p.add_argument("--pk-classes", type=int, default=12,
                   help="classes per P x K batch (triplet-inbatch)")
    p.add_argument("--refresh", type=int, default=100,
                   help="re-embed and upsert the training collection every R steps")
    p.add_argument("--train-per-class", type=int, default=None,
                   help="training images per class (fmnist default 600; glyphs: fonts "
                        "per character, default 50)")
    p.add_argument("--memory", type=int, default=16384,
                   help="xbm: the queue's size; likeness-memory: its age bound, "
                        "memory / batch steps (min_generation = step - that)")
    p.add_argument("--memory-weight", type=float, default=1.0,
                   help="weight of the memory term beside the in-batch loss")
    p.add_argument("--memory-negatives", type=int, default=8,
                   help="likeness-memory: SEMI_HARD negatives the daemon returns per anchor")
    p.add_argument("--warmup", type=int, default=-1,
                   help="steps before a memory is used (-1: steps / 5)")
    p.add_argument("--neighbours", type=int, default=None,
                   help="likeness-batches: classes of a batch chosen as the anchor "
                        "class's neighbours (default: half of the others)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aug-prob", type=float, default=0.5)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--address", help="an existing daemon; default: start one")
    p.add_argument("--binary", default=default_binary())
    p.add_argument("--out", help="results JSON (runs merge into it)")
    p.add_argument("--report", nargs="+", help="result files: print tables, write plots")
    p.add_argument("--plots", default=os.path.join(ROOT, "docs"))
    return p.parse_args(argv)


def load_benchmark(args):
    if args.benchmark == "cjk":
        args.train_per_class = args.train_per_class or 0
        return cjk_benchmark(args.train_per_class)
    if args.benchmark == "fmnist":
        args.train_per_class = args.train_per_class or 600
        return fmnist_benchmark(args.train_per_class)
    args.train_per_class = args.train_per_class or 50
    return glyph_benchmark(args.train_per_class)


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        for path in args.report:
            with open(path) as fh:
                res = json.load(fh)
            print(f"\n### {res['benchmark']} ({res['settings']['steps']} steps)\n")
            stem = os.path.splitext(os.path.basename(path))[0]
            if res["benchmark"] == "cjk":
                report_round2(res, stem, args.plots)
                continue
            print(table(res))
            png = os.path.join(args.plots, f"experiment-{stem}.png")
            plot(res, png)
            print("\nwrote", png)
        return
    # a SIGTERM still runs the finally blocks, so the daemon started here stops too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    if args.methods is None:
        args.methods = ",".join(DEFAULT_METHODS[args.benchmark])
    if args.neighbours is None:
        args.neighbours = (args.pk_classes - 1) // 2
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}")
    t0 = time.perf_counter()
    bench = load_benchmark(args)
    print(json.dumps(bench["describe"]), f"({time.perf_counter() - t0:.0f}s)", flush=True)

    result = {"benchmark": args.benchmark, "runs": {}}
    if args.out and os.path.exists(args.out):
        with open(args.out) as fh:
            result = json.load(fh)
    settings = {k: getattr(args, k) for k in (
        "steps", "batch", "anchors", "pk_classes", "refresh", "train_per_class", "width",
        "lr", "aug_prob", "eval_every", "threads")}
    if args.benchmark == "cjk":
        settings.update({k: getattr(args, k) for k in (
            "memory", "memory_weight", "memory_negatives", "warmup", "neighbours")})
    if result.get("settings", settings) != settings:
        raise SystemExit(f"{args.out} holds runs with other settings: {result['settings']}")
    result["settings"] = settings
    result["describe"] = bench["describe"]
    test, val = bench["test"], bench["val"]
    result["pixels"] = protocol_metrics(pixels, test, val)
    result["pixels_val_recall_at_1"] = fc.recall_at_1(
        pixels(val["query"]), val["query_labels"], pixels(val["enrol"]), val["enrol_labels"])
    result["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                             "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads()}

    daemon = client = None
    if any(m in LIKENESS_METHODS for m in methods):
        import likeness
        if args.address is None:
            daemon = Daemon(args.binary)
            args.address = daemon.address
        client = likeness.Client(args.address, timeout=120)
        client.wait_ready(60)
    try:
        for seed in args.seeds:
            for m in methods:
                run = Run(bench, m, seed, args, client, daemon)
                curve, info = run.train()
                test_res = run.evaluate()
                result["runs"][f"{m}/{seed}"] = {"method": m, "seed": seed, "test": test_res,
                                                 "info": info, "curve": curve}
                print(json.dumps({"method": m, "seed": seed,
                                  "r1": [round(test_res[k]["recall_at_1"], 4)
                                         for k in ("clean", "reid")],
                                  "verif": [round(test_res[k]["verification_accuracy"], 4)
                                            for k in ("clean", "reid")],
                                  "val": [round(v, 3) for v in curve["val_recall_at_1"]],
                                  "wall": round(info["wall_seconds"], 1),
                                  "refresh": round(info["refresh_seconds"], 1),
                                  "mined": info["mined"]}), flush=True)
                if args.out:
                    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                    tmp = args.out + ".tmp"
                    with open(tmp, "w") as fh:
                        json.dump(result, fh)
                    os.replace(tmp, args.out)
    finally:
        if client is not None:
            client.close()
        if daemon is not None:
            daemon.stop()
    if args.out:
        print(table(result))


if __name__ == "__main__":
    main()
