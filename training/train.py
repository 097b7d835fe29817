#!/usr/bin/env python3
"""Train the fmnist-triplet image embedder on Fashion-MNIST classes 0-5 and
export it to ONNX.

Loss: triplet loss on L2-normalised 64-d embeddings (Euclidean distance on
the unit sphere, which is a monotone function of cosine distance), with
in-batch mining.  Batches are P x K (all 6 training classes x K images).
The first epoch(s) use "batch-all" (mean over the triplets that still
violate the margin), later epochs use "batch-hard" (hardest positive and
hardest negative per anchor) or "semi-hard" mining.

Augmentation mimics the re-identification perturbation used at evaluation
time (rotation, scale, shift, brightness, black square), slightly wider.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import fmnist_common as fc  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=187,
                   help="0 = one pass over the training images")
    p.add_argument("--k", type=int, default=16, help="images per class per batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--margin", type=float, default=0.3)
    p.add_argument("--mining", choices=["batch_hard", "semi_hard"], default="semi_hard")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="epochs of batch-all mining before --mining kicks in")
    p.add_argument("--aug-prob", type=float, default=0.85,
                   help="probability that an image is augmented")
    p.add_argument("--instance-weight", type=float, default=2.0,
                   help="weight of an extra instance-level batch-hard triplet term "
                        "(two augmented views of one image are the positives); "
                        "0 disables it and uses one view per image")
    p.add_argument("--instance-margin", type=float, default=0.1)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=os.path.join(HERE, "..", "models", "fmnist-triplet"))
    p.add_argument("--meta", default=os.path.join(HERE, "artifacts", "train_meta.json"))
    p.add_argument("--checkpoint", default=os.path.join(HERE, "artifacts", "model.pt"))
    return p.parse_args()


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------
# Augmentation (torch, on [0,1] images before normalisation)
# --------------------------------------------------------------------------
def augment(x, gen, prob):
    """x: [B,1,28,28] float in [0,1]. Returns augmented copy."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]

    def U(lo, hi, n=b):
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    apply = (torch.rand(b, generator=gen) < prob).float()
    angle = torch.deg2rad(U(-20.0, 20.0)) * apply
    scale = 1.0 + (U(0.85, 1.15) - 1.0) * apply
    tx = U(-4.0, 4.0) * apply
    ty = U(-4.0, 4.0) * apply
    bright = 1.0 + (U(0.5, 1.5) - 1.0) * apply

    # affine_grid maps output (normalised) coords to input coords:
    # in = (1/s) R(-a) (out - t)
    cos, sin = torch.cos(angle), torch.sin(angle)
    inv_s = 1.0 / scale
    tnx, tny = tx * (2.0 / 28.0), ty * (2.0 / 28.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * inv_s
    theta[:, 0, 1] = sin * inv_s
    theta[:, 1, 0] = -sin * inv_s
    theta[:, 1, 1] = cos * inv_s
    theta[:, 0, 2] = -(theta[:, 0, 0] * tnx + theta[:, 0, 1] * tny)
    theta[:, 1, 2] = -(theta[:, 1, 0] * tnx + theta[:, 1, 1] * tny)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False)
    y = (y * bright.view(b, 1, 1, 1)).clamp(0.0, 1.0)

    # random black square (random erasing with zeros), 6..10 px
    erase = (torch.rand(b, generator=gen) < 0.75 * prob)
    size = torch.randint(6, 11, (b,), generator=gen)
    py = (torch.rand(b, generator=gen) * (28 - size + 1)).long()
    px = (torch.rand(b, generator=gen) * (28 - size + 1)).long()
    rows = torch.arange(28).view(1, 28, 1)
    cols = torch.arange(28).view(1, 1, 28)
    s = size.view(b, 1, 1)
    box = ((rows >= py.view(b, 1, 1)) & (rows < py.view(b, 1, 1) + s)
           & (cols >= px.view(b, 1, 1)) & (cols < px.view(b, 1, 1) + s))
    box = box & erase.view(b, 1, 1)
    y = y.masked_fill(box.unsqueeze(1), 0.0)
    return y


# --------------------------------------------------------------------------
# Triplet losses with in-batch mining
# --------------------------------------------------------------------------
def pairwise_dist(e):
    import torch
    # e is L2-normalised: ||a-b||^2 = 2 - 2 a.b
    d2 = (2.0 - 2.0 * (e @ e.t())).clamp_min(0.0)
    return torch.sqrt(d2 + 1e-12)


def triplet_loss(e, labels, margin, mode):
    import torch
    d = pairwise_dist(e)
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos_mask = same & ~eye
    neg_mask = ~same
    stats = {"mean_pos_dist": float(d[pos_mask].mean()),
             "mean_neg_dist": float(d[neg_mask].mean())}
    if mode == "batch_all":
        # t[a,p,n] = d(a,p) - d(a,n) + margin over valid triplets
        t = d.unsqueeze(2) - d.unsqueeze(1) + margin
        valid = pos_mask.unsqueeze(2) & neg_mask.unsqueeze(1)
        t = torch.relu(t) * valid
        active = (t > 1e-16).float().sum()
        loss = t.sum() / active.clamp_min(1.0)
        stats["active_frac"] = float(active / valid.float().sum())
    elif mode == "batch_hard":
        hardest_pos = (d * pos_mask).max(dim=1).values
        big = d.max().detach() + 1.0
        hardest_neg = (d + big * (~neg_mask)).min(dim=1).values
        per = torch.relu(hardest_pos - hardest_neg + margin)
        loss = per.mean()
        stats["active_frac"] = float((per > 0).float().mean())
    elif mode == "semi_hard":
        # for every (a,p): the closest negative farther than d(a,p);
        # if there is none, the farthest negative.
        dap = d.unsqueeze(2)                      # [a,p,1]
        dan = d.unsqueeze(1)                      # [a,1,n]
        nm = neg_mask.unsqueeze(1)
        semi = nm & (dan > dap)
        big = d.max().detach() + 1.0
        semi_neg = torch.where(semi, dan, big).min(dim=2).values
        far_neg = torch.where(nm, dan, -big).max(dim=2).values
        has_semi = semi.any(dim=2)
        chosen = torch.where(has_semi, semi_neg, far_neg)
        per = torch.relu(d - chosen + margin)[pos_mask]
        loss = per.mean()
        stats["active_frac"] = float((per > 0).float().mean())
    else:
        raise ValueError(mode)
    return loss, stats


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    images, labels = fc.load_split("train")
    keep = np.isin(labels, fc.TRAIN_CLASSES)
    images, labels = images[keep], labels[keep]
    print(f"training images: {len(images)} (classes {fc.TRAIN_CLASSES})", flush=True)

    # Normalisation constants from the training subset, rounded so the
    # manifest carries exactly what was used.
    x01 = images.astype(np.float64) / 255.0
    mean = round(float(x01.mean()), 4)
    std = round(float(x01.std()), 4)
    print(f"mean={mean} std={std}", flush=True)

    x_all = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y_all = torch.from_numpy(labels)
    by_class = [torch.nonzero(y_all == c).flatten() for c in fc.TRAIN_CLASSES]

    model = fc.build_model(width=args.width)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)

    batch = args.k * len(fc.TRAIN_CLASSES)
    steps = args.steps_per_epoch or (len(images) // batch)
    total_steps = steps * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr,
                            weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=total_steps, pct_start=0.15,
        anneal_strategy="cos")
    gen = torch.Generator().manual_seed(args.seed)

    history = []
    t0 = time.time()
    for epoch in range(args.epochs):
        mode = "batch_all" if epoch < args.warmup_epochs else args.mining
        model.train()
        run_loss, run_active, run_dp, run_dn = 0.0, 0.0, 0.0, 0.0
        te = time.time()
        for step in range(steps):
            idx = torch.cat([
                cls[torch.randint(len(cls), (args.k,), generator=gen)]
                for cls in by_class])
            if args.instance_weight > 0:
                xa = augment(x_all[idx], gen, args.aug_prob)
                xv = augment(x_all[idx], gen, 1.0)
                xb = (torch.cat([xa, xv]) - mean) / std
                emb = model(xb)
                yb = torch.cat([y_all[idx], y_all[idx]])
                loss, st = triplet_loss(emb, yb, args.margin, mode)
                inst = torch.arange(len(idx)).repeat(2)
                li, _ = triplet_loss(emb, inst, args.instance_margin, "batch_hard")
                loss = loss + args.instance_weight * li
            else:
                xb = augment(x_all[idx], gen, args.aug_prob)
                xb = (xb - mean) / std
                emb = model(xb)
                loss, st = triplet_loss(emb, y_all[idx], args.margin, mode)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += float(loss.detach())
            run_active += st["active_frac"]
            run_dp += st["mean_pos_dist"]
            run_dn += st["mean_neg_dist"]
        rec = {"epoch": epoch + 1, "mode": mode, "loss": run_loss / steps,
               "active_frac": run_active / steps,
               "mean_pos_dist": run_dp / steps, "mean_neg_dist": run_dn / steps,
               "epoch_seconds": round(time.time() - te, 1)}
        history.append(rec)
        print(json.dumps(rec), flush=True)
    train_seconds = time.time() - t0
    print(f"training took {train_seconds:.0f}s", flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
    torch.save(model.state_dict(), args.checkpoint)

    # ---------------------------------------------------------------- export
    model.eval()
    os.makedirs(args.out_dir, exist_ok=True)
    onnx_path = os.path.join(args.out_dir, "model.onnx")
    dummy = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        model, dummy, onnx_path, dynamo=False, opset_version=17,
        input_names=["input"], output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
        do_constant_folding=True)

    import onnx
    import onnxruntime as ort
    m = onnx.load(onnx_path)
    onnx.checker.check_model(m, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in m.graph.initializer), "external data in ONNX"

    # ORT vs torch on a batch of real (augmented + clean) training images
    rng = np.random.default_rng(args.seed + 7)
    pick = torch.from_numpy(rng.choice(len(images), 256, replace=False))
    check = torch.cat([x_all[pick[:128]],
                       augment(x_all[pick[128:]], torch.Generator().manual_seed(1), 1.0)])
    check = (check - mean) / std
    with torch.no_grad():
        ref = model(check).numpy()
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = sess.run(["embedding"], {"input": check.numpy().astype(np.float32)})[0]
    max_diff = float(np.abs(got - ref).max())
    print(f"ORT vs torch max abs diff: {max_diff:.3e}", flush=True)
    assert got.shape == (256, fc.EMBED_DIM)
    assert max_diff < 1e-5, max_diff

    meta = {
        "args": vars(args),
        "mean": mean, "std": std,
        "parameters": n_params,
        "train_images": int(len(images)),
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "onnx_bytes": os.path.getsize(onnx_path),
        "onnx_opset": [(o.domain, o.version) for o in m.opset_import],
        "ort_vs_torch_max_abs_diff": max_diff,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "python_version": platform.python_version(),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.meta)), exist_ok=True)
    with open(args.meta, "w") as fh:
        json.dump(meta, fh, indent=2)
    print(f"wrote {onnx_path} ({meta['onnx_bytes']} bytes) and {args.meta}")


if __name__ == "__main__":
    main()
