#!/usr/bin/env python3
"""Train the fmnist-pair model (a pair / "compare two images" network in
the spirit of Zagoruyko & Komodakis 2015, "Learning to compare image
patches") on Fashion-MNIST TRAIN classes 0-5 and export it to ONNX.

Two architectures:

  twochan   the two images are stacked as the 2 channels of one input and
            a single CNN maps them to one logit.  The exported graph runs
            both orders (a,b) and (b,a) and averages the two probabilities,
            so the shipped score is exactly symmetric.
  siamese   a shared tower (the fmnist-triplet embedder, optionally
            initialised from its checkpoint) gives fa, fb; a small MLP on
            [|fa-fb|, fa*fb] gives the logit.  Symmetric by construction.

Loss: binary cross-entropy on "same class", balanced between same and
different pairs.  ONNX: inputs `a`, `b` float32 [batch,1,28,28]
(preprocessed like the embedder), output `score` float32 [batch] =
P(same class), the sigmoid being inside the graph.

The defaults are the shipped run (siamese, 1000 steps).  The two-channel
run that was tried: --arch twochan --batch 128 --steps 2500.

At the end the exported file is checked against torch with ONNX Runtime
and scored on the validation set (TEST split, classes 0-5; see
fmnist_common.pair_validation_set).  The held-out classes 6-9 are never
touched here.
"""

import argparse
import json
import os
import platform
import random
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
import fmnist_common as fc  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["twochan", "siamese"], default="siamese")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16,
                   help="twochan: pairs per step; siamese: images per class per "
                        "step (6 classes, two views each; all pairs in the batch)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tower-lr-mult", type=float, default=0.3,
                   help="siamese: lr multiplier for a tower initialised from the embedder")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--aug-prob", type=float, default=0.75,
                   help="probability that each side of a pair is augmented")
    p.add_argument("--hard-frac", type=float, default=0.5,
                   help="twochan: fraction of different-class pairs drawn from the "
                        "embedder's nearest different-class neighbours")
    p.add_argument("--hard-k", type=int, default=10,
                   help="twochan: neighbours kept per image for hard negatives")
    p.add_argument("--instance-frac", type=float, default=0.1,
                   help="twochan: fraction of same-class pairs that are two "
                        "views of one image")
    p.add_argument("--init", default=os.path.join(HERE, "artifacts", "model.pt"),
                   help="siamese: embedder checkpoint for the tower ('' = random init)")
    p.add_argument("--embedder", default=os.path.join(ROOT, "models", "fmnist-triplet", "model.onnx"),
                   help="embedder ONNX used for hard negatives and validation re-ranking")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "models", "fmnist-pair"))
    p.add_argument("--artifacts", default=os.path.join(HERE, "artifacts", "pair"),
                   help="where the checkpoint and train_pair_meta.json go")
    return p.parse_args()


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------
def _block(cin, cout):
    import torch.nn as nn
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def build_twochan(width=32):
    import torch
    import torch.nn as nn

    w = width

    class TwoChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                _block(2, w), nn.MaxPool2d(2),           # 28 -> 14
                _block(w, 2 * w), nn.MaxPool2d(2),       # 14 -> 7
                _block(2 * w, 4 * w),
                _block(4 * w, 4 * w), nn.MaxPool2d(2),   # 7 -> 3
            )
            self.head = nn.Sequential(
                nn.Flatten(), nn.Linear(4 * w * 9, 128), nn.ReLU(inplace=True),
                nn.Linear(128, 1))

        def logit(self, a, b):
            """One order only; used for training."""
            return self.head(self.features(torch.cat([a, b], dim=1))).view(-1)

        def forward(self, a, b):
            # both orders in one batch, mean of the two probabilities
            x = torch.cat([torch.cat([a, b], dim=1), torch.cat([b, a], dim=1)], dim=0)
            p = torch.sigmoid(self.head(self.features(x)))
            return p.view(2, -1).mean(dim=0)

    return TwoChannel()


def build_siamese(width=32):
    import torch
    import torch.nn as nn

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = fc.build_model(width=width)   # -> unit-norm 64-d
            d = fc.EMBED_DIM
            self.decision = nn.Sequential(
                nn.Linear(2 * d, 64), nn.ReLU(inplace=True), nn.Linear(64, 1))
            self.scale = float(np.sqrt(d))   # unit-norm entries ~ 1/sqrt(d)

        def embed(self, x):
            return self.tower(x) * self.scale

        def pair_logit(self, fa, fb):
            return self.decision(torch.cat([(fa - fb).abs(), fa * fb], dim=1)).view(-1)

        def forward(self, a, b):
            f = self.embed(torch.cat([a, b], dim=0))
            d = f.shape[1]
            f = f.view(2, -1, d)
            return torch.sigmoid(self.pair_logit(f[0], f[1]))

    return Siamese()


# --------------------------------------------------------------------------
# Pair sampling
# --------------------------------------------------------------------------
def embed_with_onnx(path, images_u8, batch=1000):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(images_u8), batch):
        x = fc.preprocess(images_u8[i:i + batch], fc.NORM_MEAN, fc.NORM_STD)
        out.append(sess.run(["embedding"], {"input": x})[0])
    return np.concatenate(out)


def hard_negative_table(emb, labels, k, chunk=1000):
    """[N,k]: per image, the k nearest images (cosine) of another class."""
    emb = emb.astype(np.float32)
    out = np.empty((len(emb), k), dtype=np.int64)
    for i in range(0, len(emb), chunk):
        sim = emb[i:i + chunk] @ emb.T
        sim[labels[i:i + chunk, None] == labels[None, :]] = -np.inf
        part = np.argpartition(-sim, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, part, axis=1), axis=1)
        out[i:i + chunk] = np.take_along_axis(part, order, axis=1)
    return out


def sample_twochan_pairs(n, labels, by_class, hard, args, gen):
    """n pairs (ia, ib, same): n/2 same-class (instance_frac of them the same
    image twice), n/2 different-class (hard_frac from the hard table)."""
    import torch
    n_same = n // 2
    n_diff = n - n_same
    n_cls = len(by_class)
    # same class: class uniformly, two images of it
    cls = torch.randint(n_cls, (n_same,), generator=gen)
    sa = torch.empty(n_same, dtype=torch.long)
    sb = torch.empty(n_same, dtype=torch.long)
    for c in range(n_cls):
        m = cls == c
        cnt = int(m.sum())
        pool = by_class[c]
        sa[m] = pool[torch.randint(len(pool), (cnt,), generator=gen)]
        sb[m] = pool[torch.randint(len(pool), (cnt,), generator=gen)]
    inst = torch.rand(n_same, generator=gen) < args.instance_frac
    sb = torch.where(inst, sa, sb)
    # different class: random anchor, random other class or hard neighbour
    da = torch.randint(len(labels), (n_diff,), generator=gen)
    shift = torch.randint(1, n_cls, (n_diff,), generator=gen)
    other = (labels[da] + shift) % n_cls          # classes are 0..5
    db = torch.empty(n_diff, dtype=torch.long)
    for c in range(n_cls):
        m = other == c
        cnt = int(m.sum())
        pool = by_class[c]
        db[m] = pool[torch.randint(len(pool), (cnt,), generator=gen)]
    use_hard = torch.rand(n_diff, generator=gen) < args.hard_frac
    pick = torch.randint(hard.shape[1], (n_diff,), generator=gen)
    db = torch.where(use_hard, hard[da, pick], db)
    ia = torch.cat([sa, da])
    ib = torch.cat([sb, db])
    y = torch.cat([torch.ones(n_same), torch.zeros(n_diff)])
    # random order inside each pair
    swap = torch.rand(n, generator=gen) < 0.5
    ia, ib = torch.where(swap, ib, ia), torch.where(swap, ia, ib)
    return ia, ib, y


def balanced_bce(logit, y):
    import torch.nn.functional as F
    per = F.binary_cross_entropy_with_logits(logit, y, reduction="none")
    pos = y > 0.5
    return 0.5 * per[pos].mean() + 0.5 * per[~pos].mean()


# --------------------------------------------------------------------------
def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    import train as tr   # the embedder's augmentation, reused unchanged

    images, labels = fc.load_split("train")
    keep = np.isin(labels, fc.TRAIN_CLASSES)
    images, labels = images[keep], labels[keep]
    print(f"training images: {len(images)} (classes {fc.TRAIN_CLASSES})", flush=True)
    mean, std = fc.NORM_MEAN, fc.NORM_STD

    x_all = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    by_class = [torch.nonzero(y_all == c).flatten() for c in fc.TRAIN_CLASSES]
    gen = torch.Generator().manual_seed(args.seed)

    t_prep = time.time()
    hard = None
    if args.arch == "twochan":
        model = build_twochan(args.width)
        params = [{"params": model.parameters(), "lr": args.lr}]
        if args.hard_frac > 0:
            emb = embed_with_onnx(args.embedder, images)
            hard = torch.from_numpy(hard_negative_table(emb, labels, args.hard_k))
        else:
            hard = torch.zeros(len(images), 1, dtype=torch.long)
    else:
        model = build_siamese(args.width)
        tower_mult = 1.0
        if args.init:
            sd = torch.load(args.init, map_location="cpu")
            model.tower.load_state_dict(sd)
            tower_mult = args.tower_lr_mult
            print(f"tower initialised from {args.init}", flush=True)
        params = [{"params": model.tower.parameters(), "lr": args.lr * tower_mult},
                  {"params": model.decision.parameters(), "lr": args.lr}]
    prep_seconds = time.time() - t_prep
    n_params = sum(p.numel() for p in model.parameters())
    print(f"arch {args.arch}, parameters: {n_params}, prep {prep_seconds:.0f}s", flush=True)

    opt = torch.optim.AdamW(params, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in params], total_steps=args.steps,
        pct_start=0.15, anneal_strategy="cos")

    history = []
    log_every = max(args.steps // 10, 1)
    acc_loss, acc_n, acc_correct, acc_pairs = 0.0, 0, 0.0, 0
    t0 = time.time()
    for step in range(args.steps):
        model.train()
        if args.arch == "twochan":
            ia, ib, y = sample_twochan_pairs(args.batch, y_all, by_class, hard, args, gen)
            xa = (tr.augment(x_all[ia], gen, args.aug_prob) - mean) / std
            xb = (tr.augment(x_all[ib], gen, args.aug_prob) - mean) / std
            logit = model.logit(xa, xb)
        else:
            idx = torch.cat([cls[torch.randint(len(cls), (args.batch,), generator=gen)]
                             for cls in by_class])
            v1 = tr.augment(x_all[idx], gen, args.aug_prob)
            v2 = tr.augment(x_all[idx], gen, args.aug_prob)
            f = model.embed((torch.cat([v1, v2]) - mean) / std)
            lab = torch.cat([y_all[idx], y_all[idx]])
            i, j = torch.triu_indices(len(lab), len(lab), offset=1)
            logit = model.pair_logit(f[i], f[j])
            y = (lab[i] == lab[j]).float()
        loss = balanced_bce(logit, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc_loss += float(loss.detach())
        acc_n += 1
        acc_correct += float(((logit.detach() > 0).float() == y).float().sum())
        acc_pairs += len(y)
        if (step + 1) % log_every == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss": acc_loss / acc_n,
                   "train_pair_acc": acc_correct / acc_pairs,
                   "elapsed_s": round(time.time() - t0, 1)}
            history.append(rec)
            print(json.dumps(rec), flush=True)
            acc_loss, acc_n, acc_correct, acc_pairs = 0.0, 0, 0.0, 0
    train_seconds = time.time() - t0
    print(f"training took {train_seconds:.0f}s (+{prep_seconds:.0f}s preparation)", flush=True)

    os.makedirs(args.artifacts, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.artifacts, "model_pair.pt"))

    # ---------------------------------------------------------------- export
    model.eval()
    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "model.onnx")
    dummy = torch.zeros(3, 1, 28, 28)
    torch.onnx.export(
        model, (dummy, dummy.clone()), onnx_path, dynamo=False, opset_version=17,
        input_names=["a", "b"], output_names=["score"],
        dynamic_axes={"a": {0: "batch"}, "b": {0: "batch"}, "score": {0: "batch"}},
        do_constant_folding=True)

    import onnx
    import onnxruntime as ort
    m = onnx.load(onnx_path)
    onnx.checker.check_model(m, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in m.graph.initializer), "external data in ONNX"
    out_shape = [d.dim_param or d.dim_value
                 for d in m.graph.output[0].type.tensor_type.shape.dim]
    assert out_shape == ["batch"], out_shape
    onnx_bytes = os.path.getsize(onnx_path)
    assert onnx_bytes < 5 * 1024 * 1024, onnx_bytes

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])

    # ORT vs torch: 256 pairs of training images (half clean, half augmented),
    # same and different class mixed, and batch size 1.
    cg = torch.Generator().manual_seed(args.seed + 7)
    ia = torch.randint(len(images), (256,), generator=cg)
    ib = torch.where(torch.rand(256, generator=cg) < 0.5,
                     ia, torch.randint(len(images), (256,), generator=cg))
    ca = torch.cat([x_all[ia[:128]], tr.augment(x_all[ia[128:]], cg, 1.0)])
    cb = torch.cat([x_all[ib[:128]], tr.augment(x_all[ib[128:]], cg, 1.0)])
    ca, cb = (ca - mean) / std, (cb - mean) / std
    with torch.no_grad():
        ref = model(ca, cb).numpy()
        ref_swapped = model(cb, ca).numpy()
    got = sess.run(["score"], {"a": ca.numpy(), "b": cb.numpy()})[0]
    got1 = sess.run(["score"], {"a": ca[:1].numpy(), "b": cb[:1].numpy()})[0]
    assert got.shape == (256,) and got.dtype == np.float32, (got.shape, got.dtype)
    assert got1.shape == (1,), got1.shape
    max_diff = float(max(np.abs(got - ref).max(), abs(float(got1[0]) - float(ref[0]))))
    asym = float(np.abs(ref - ref_swapped).max())
    print(f"ORT vs torch max abs diff: {max_diff:.3e}; |s(a,b)-s(b,a)| max {asym:.2e}",
          flush=True)
    assert max_diff < 1e-5, max_diff

    # ------------------------------------------------------------ validation
    def score_fn(a_u8, b_u8, batch=1000):
        out = []
        for i in range(0, len(a_u8), batch):
            out.append(sess.run(["score"], {
                "a": fc.preprocess(a_u8[i:i + batch], mean, std),
                "b": fc.preprocess(b_u8[i:i + batch], mean, std)})[0])
        return np.concatenate(out)

    def embed_fn(u8):
        return embed_with_onnx(args.embedder, u8)

    val = fc.pair_validation_set()
    val_fig, val_raw = fc.pair_model_figures(score_fn, embed_fn, val)
    both = np.concatenate([val_raw["clean"]["pair_scores"], val_raw["reid"]["pair_scores"]])
    same2 = np.concatenate([val["pairs"][:, 2], val["pairs"][:, 2]]).astype(bool)
    t_both, acc_both = fc.score_best_threshold(both, same2)
    val_fig["clean_plus_reid"] = {"best_threshold": t_both, "best_accuracy": acc_both,
                                  "accuracy_at_0.5": fc.score_accuracy_at(both, same2, 0.5)}
    print("validation (TEST split, classes 0-5):", json.dumps(val_fig, indent=1), flush=True)

    meta = {
        "args": vars(args),
        "argv": sys.argv[1:],
        "mean": mean, "std": std,
        "parameters": n_params,
        "train_images": int(len(images)),
        "train_seconds": round(train_seconds, 1),
        "prep_seconds": round(prep_seconds, 1),
        "history": history,
        "onnx_bytes": onnx_bytes,
        "onnx_opset": [(o.domain, o.version) for o in m.opset_import],
        "ort_vs_torch_max_abs_diff": max_diff,
        "torch_max_asymmetry": asym,
        "validation": val_fig,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "python_version": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu_model": tr.cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
    meta_path = os.path.join(args.artifacts, "train_pair_meta.json")
    with open(meta_path, "w") as fh:
        json.dump(meta, fh, indent=2)
    print(f"wrote {onnx_path} ({onnx_bytes} bytes) and {meta_path}")


if __name__ == "__main__":
    main()
