#!/usr/bin/env python3
"""Train a glyph embedder on neighbour-class batches, with the daemon keeping the vectors.

The use of likeness that won round two of docs/experiment.md (issue 17): P x K batches
whose classes the daemon's index chose to be hard for each other (MineBatches, through
likeness.torch.NeighbourClassBatches), and pytorch-metric-learning's in-batch
TripletMarginMiner (semi-hard) + TripletMarginLoss inside each batch. Here the trainer
never embeds the training set itself: it exports what it trained to ONNX, publishes it
(Models.Publish) and activates it on the training collection (Models.Activate), and
the daemon re-embeds the stored images. The run:

1. loads a glyph data set (a class is a character, an instance is a font face):
   --data cjk, the CJK benchmark (training/cjk.py: GB2312 ideographs in Debian's CJK
   fonts, training/setup-cjk.sh installs them; round two's split and test protocol), or
   --data latin, Latin, Greek and Cyrillic letters in the fonts fontconfig finds (a
   small set that runs anywhere: Pillow's own font when there are none);
2. publishes the untrained network as version 0 and creates the training collection
   with it: each item is a training image stored as its PNG (the input the daemon
   re-embeds later), labelled with its character;
3. trains fmnist_common.build_model (round two's network) for --warmup steps on random
   P x K batches, then exports, publishes and activates version 1 on the collection,
   and trains --steps steps on NeighbourClassBatches, refreshing the same way every
   --refresh steps (a new version each time);
4. exports and publishes the final version, enrols a gallery of unseen characters in
   held-out fonts into a second collection (with version 0, as a gallery enrolled long
   ago would be), measures recall@1 of other fonts' glyphs of those characters through
   the daemon's search, activates the final version on the gallery (the daemon
   re-embeds it) and measures again;
5. prints where the time went: trainer CPU and wall seconds per phase, publish,
   activation and batch-stream waits.

    # the CJK benchmark (sudo training/setup-cjk.sh first), a daemon of its own:
    python3 clients/python/examples/train_neighbour_batches.py --binary target/release/likeness
    # a small run anywhere, against a running daemon:
    python3 clients/python/examples/train_neighbour_batches.py --data latin \\
        --address 127.0.0.1:50051 --warmup 20 --steps 60 --refresh 30 --classes 8

Needs the likeness package with its torch extra, pytorch-metric-learning, onnx and
Pillow; it imports the network, the augmentation, the CJK loader and the ONNX export
(training/onnx_release.py) from training/.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO, "training"))
import experiment  # noqa: E402  (Daemon: `likeness serve` on a free port)
import fmnist_common as fc  # noqa: E402  (build_model, reid_perturb)
import glyphs  # noqa: E402  (the Latin/Greek/Cyrillic character set and renderer)
from onnx_release import export, png  # noqa: E402  (ONNX + model.toml; PNG inputs)

MARGIN = 0.2  # round two's triplet margin


# ---------------------------------------------------------------- data
def load_cjk():
    """Round two's CJK benchmark as it is: training characters in training fonts; per
    unseen test character 5 gallery and 5 query glyphs from held-out fonts."""
    import cjk
    b = experiment.cjk_benchmark()
    chars = np.asarray(cjk.CHARS)
    t = b["test"]
    return {"train": b["train_images"], "train_labels": chars[b["train_labels"]],
            "gallery": t["enrol"], "gallery_labels": chars[t["enrol_labels"]],
            "query": t["query"], "query_labels": chars[t["query_labels"]]}


def font_faces():
    """(path, face index) of every face fontconfig knows that maps all of glyphs.CHARS."""
    charset = " ".join(f"{ord(c):x}" for c in glyphs.CHARS)
    try:
        out = subprocess.run(["fc-list", "-f", "%{file}\t%{index}\n", f":charset={charset}"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    faces = {(p, int(i)) for p, i in (line.split("\t") for line in out.splitlines() if line)}
    return sorted(f for f in faces if not any(s in f[0].lower() for s in glyphs.SKIP_NAME))


def load_latin(max_fonts=12, seed=7):
    """glyphs.CHARS (117 letters and digits) in up to max_fonts distinct faces. 60% of
    the characters train, in 60% of the instances; the other characters' glyphs in the
    held-out instances are the gallery (the first half of them) and the queries."""
    from PIL import ImageFont
    rng = np.random.default_rng(seed)
    probe, fonts, prints = "AaGgQqRr0369", [], []
    faces = font_faces()
    for k in rng.permutation(len(faces)):  # until max_fonts faces that draw differently
        path, index = faces[k]
        try:
            p = [glyphs.render(ImageFont.truetype(path, 40, index=index), c) for c in probe]
        except OSError:  # a face FreeType cannot read
            continue
        if any(a is None for a in p):  # a probe glyph without ink
            continue
        p = np.stack(p).astype(np.float32)
        if all(np.abs(p - q).mean() >= 2.0 for q in prints):  # glyphs.py's duplicate rule
            fonts.append(lambda size, path=path, index=index:
                         ImageFont.truetype(path, size, index=index))
            prints.append(p)
        if len(fonts) == max_fonts:
            break
    if len(fonts) < 4:  # a machine with few fonts or none: Pillow's own too (Latin only)
        fonts.append(lambda size: ImageFont.load_default(size=size))
    # An instance is a face at a size; with fewer than 8 faces, each at several sizes,
    # so that a class has enough instances to train on and to test with.
    sizes = np.linspace(32, 48, -(-8 // len(fonts))).round().astype(int) if len(fonts) < 8 else [40]
    images, labels, inst = [], [], []
    for f_no, face in enumerate(fonts):
        for s_no, size in enumerate(sizes):
            font = face(int(size))
            tofu = glyphs.render(font, "\U0010fffd")  # what the face draws for a missing glyph
            for c in glyphs.CHARS:
                a = glyphs.render(font, c)
                if a is not None and (tofu is None or not np.array_equal(a, tofu)):
                    images.append(a)
                    labels.append(c)
                    inst.append(f_no * len(sizes) + s_no)
    images, labels, inst = np.stack(images), np.asarray(labels), np.asarray(inst)
    chars, n_inst = np.unique(labels), inst.max() + 1
    train_chars = rng.permutation(chars)[: int(0.6 * len(chars))]
    order = rng.permutation(n_inst)
    train_inst = order[: max(2, int(0.6 * n_inst))]
    held = order[len(train_inst):]
    gallery_inst = held[: max(1, len(held) // 2)]
    is_train_char = np.isin(labels, train_chars)
    tr = is_train_char & np.isin(inst, train_inst)
    ga = ~is_train_char & np.isin(inst, gallery_inst)
    qu = ~is_train_char & np.isin(inst, held) & ~np.isin(inst, gallery_inst)
    qu &= np.isin(labels, labels[ga])  # a query's character is in the gallery
    return {"train": images[tr], "train_labels": labels[tr],
            "gallery": images[ga], "gallery_labels": labels[ga],
            "query": images[qu], "query_labels": labels[qu]}


# ---------------------------------------------------------------- time accounting
class Clock:
    """Wall and trainer-CPU seconds per phase (process_time: this process only)."""

    def __init__(self):
        self.phases = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            p = self.phases.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0, "times": 0})
            p["wall_s"] += time.perf_counter() - w
            p["cpu_s"] += time.process_time() - c
            p["times"] += 1


# ---------------------------------------------------------------- search through the daemon
def recall_at_1(client, collection, images, labels):
    """Each query's nearest item in the collection, searched by image: the daemon
    embeds the queries with the collection's current model."""
    top = []
    for i in range(0, len(images), 500):
        hits = client.search_batch(collection, [png(a) for a in images[i:i + 500]], k=1)
        top.extend(hits.labels[:, 0])
    return float(np.mean(np.asarray(top) == labels))


# ---------------------------------------------------------------- the run
def run(client, args, log=print):
    import torch
    from pytorch_metric_learning import losses, miners
    from likeness.torch import NeighbourClassBatches
    import train as tr  # training/train.py: round two's augmentation

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    clock = Clock()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    name = args.name or f"{args.data}-nb-{time.strftime('%Y%m%d-%H%M%S')}"
    train_coll, gallery_coll = f"{name}-train", f"{name}-gallery"
    out_dir = args.out or tempfile.mkdtemp(prefix="likeness-nb-")

    with clock("data: load, render, encode"):
        d = load_cjk() if args.data == "cjk" else load_latin(args.fonts)
        x_u8, names = d["train"], d["train_labels"]
        classes, y = np.unique(names, return_inverse=True)
        by_class = [np.flatnonzero(y == c) for c in range(len(classes))]
        x01 = x_u8.astype(np.float64) / 255.0
        mean, std = round(float(x01.mean()), 4), round(float(x01.std()), 4)  # as in the manifest
        x = torch.from_numpy(x_u8.astype(np.float32) / 255.0).unsqueeze(1)
        inputs = [png(a) for a in x_u8]
    log(f"{args.data}: {len(x_u8)} training glyphs of {len(classes)} characters; gallery "
        f"{len(d['gallery'])}, queries {len(d['query'])} of "
        f"{len(np.unique(d['gallery_labels']))} unseen characters")

    model = fc.build_model(width=args.width)
    total = args.warmup + args.steps
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total,
                                                pct_start=0.15, anneal_strategy="cos")
    miner = miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard")
    loss_fn = losses.TripletMarginLoss(margin=MARGIN)
    gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    P, K = args.classes, args.per_class
    # round two: the anchor class, its 11 nearest classes by the index, 12 random ones
    neighbours = args.neighbours if args.neighbours is not None else (P - 1) // 2

    def train_step(rows, labels):
        xb = tr.augment(x[torch.as_tensor(rows)], gen, args.aug_prob)
        e = model((xb - mean) / std)
        triplets = miner(e, labels)
        loss = loss_fn(e, labels, triplets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach()), len(triplets[0])

    versions = []

    def release(collections):
        """Export, publish and activate the next version on `collections`; wait until
        the daemon has re-embedded them (their searches and mining use the previous
        version until the switch, so a trainer could go on meanwhile)."""
        version = str(len(versions))
        with clock("export ONNX"):
            manifest = export(model, out_dir, name, version, mean, std)
        with clock("publish"):
            info = client.publish(name, manifest)
        versions.append(version)
        for coll in collections:
            with clock("activate: daemon re-embeds"):
                client.activate(coll, name, version)
                done = client.wait_activation(coll, timeout=3600)
            log(f"  {info.name} active on {coll}: {done.count} items re-embedded, "
                f"{done.activation.rate:.0f}/s")
        return info

    # Version 0 (the untrained network) gives the collection its model, so that items
    # can be stored as images: the daemon embeds them on ingest and keeps the PNGs.
    release([])
    with clock("training collection: create, enrol"):
        client.create_collection(train_coll, model=f"{name}@0")
        client.upsert(train_coll, [f"t{i}" for i in range(len(inputs))], inputs=inputs,
                      labels=list(names), batch_size=500)

    losses_seen, triplets_seen = [], []
    with clock("warm-up: random P x K batches"):
        for _ in range(args.warmup):
            cls = rng.choice(len(classes), min(P, len(classes)), replace=False)
            rows = np.concatenate([rng.choice(by_class[c], K, replace=len(by_class[c]) < K)
                                   for c in cls])
            lv, nt = train_step(rows, torch.from_numpy(y[rows]))
            losses_seen.append(lv)
            triplets_seen.append(nt)

    stream, epoch = None, 0
    for step in range(args.steps):
        if step % args.refresh == 0:
            if stream is not None:
                stream.close()  # ends the daemon's job on the old generation
            log(f"step {args.warmup + step}: refresh")
            release([train_coll])
            stream = None
        with clock("batch stream wait"):
            while True:
                if stream is None:  # a pass over the collection as it stands now
                    ds = NeighbourClassBatches(client.address, train_coll, classes=P,
                                               per_class=K, neighbours=neighbours,
                                               seed=args.seed * 1000)
                    ds.set_epoch(epoch)
                    epoch += 1
                    stream = iter(ds)
                try:
                    b = next(stream)  # NeighbourBatch: ids, per-batch label codes, classes
                    break
                except StopIteration:
                    stream = None
        with clock("neighbour-batch training"):
            rows = np.array([int(i[1:]) for i in b.ids])  # ids are "t<row>"
            lv, nt = train_step(rows, b.labels)
            losses_seen.append(lv)
            triplets_seen.append(nt)
    if stream is not None:
        stream.close()
    log(f"trained {total} steps: loss {np.mean(losses_seen[:10]):.3f} (first 10) -> "
        f"{np.mean(losses_seen[-10:]):.3f} (last 10); {np.mean(triplets_seen):.0f} semi-hard "
        f"triplets per batch")

    # The final version reaches a gallery enrolled with version 0 through Activate.
    g_in = [png(a) for a in d["gallery"]]
    with clock("gallery: create, enrol"):
        client.create_collection(gallery_coll, model=f"{name}@0")
        client.upsert(gallery_coll, [f"g{i}" for i in range(len(g_in))], inputs=g_in,
                      labels=list(d["gallery_labels"]), batch_size=500)
    # Re-id queries: the model card's perturbation (for cjk, the very queries of round two).
    reid = fc.reid_perturb(d["query"], 20260106)[0]

    def measure():
        with clock("evaluate: search by image"):
            return {"clean": recall_at_1(client, gallery_coll, d["query"], d["query_labels"]),
                    "reid": recall_at_1(client, gallery_coll, reid, d["query_labels"])}

    recall = {"version 0": measure()}
    info = release([gallery_coll])
    recall[f"version {info.version}"] = measure()

    return {"model": name, "versions": versions, "out_dir": out_dir,
            "onnx": {v: os.path.join(out_dir, f"v{v}", "model.onnx") for v in versions},
            "mean": mean, "std": std, "train_collection": train_coll,
            "gallery_collection": gallery_coll, "train_count": len(inputs),
            "gallery_count": len(g_in), "gallery_labels": list(d["gallery_labels"]),
            "test_classes": int(len(np.unique(d["gallery_labels"]))),
            "recall_at_1": recall, "phases": clock.phases, "steps": total,
            "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0,
            "triplets_per_step": float(np.mean(triplets_seen))}


def report(res, daemon_cpu=None, log=print):
    log(f"\nrecall@1 of {res['test_classes']} unseen characters' queries against the gallery "
        f"(chance {1 / res['test_classes']:.3f}), through the daemon:")
    for when, r in res["recall_at_1"].items():
        log(f"  gallery on {when:12} clean {r['clean']:.3f}   re-id {r['reid']:.3f}")
    log(f"\n{'phase':38} {'wall s':>8} {'trainer CPU s':>14} {'times':>6}")
    for phase, p in res["phases"].items():
        log(f"{phase:38} {p['wall_s']:8.1f} {p['cpu_s']:14.1f} {p['times']:6d}")
    log(f"{'the whole run':38} {res['wall_s']:8.1f} {res['cpu_s']:14.1f}")
    if daemon_cpu is not None:
        log(f"daemon CPU: {daemon_cpu:.1f} s")
    log(f"versions {', '.join(res['versions'])} of {res['model']}: {res['out_dir']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", help="a running daemon (host:port); default: start one")
    p.add_argument("--binary", default=experiment.default_binary(),
                   help="the likeness binary to start without --address "
                        "(default $LIKENESS_BIN, else target/)")
    p.add_argument("--data", choices=("cjk", "latin"), default="cjk")
    p.add_argument("--fonts", type=int, default=12, help="--data latin: at most this many faces")
    p.add_argument("--name", help="the model's name; collections NAME-train, NAME-gallery")
    p.add_argument("--out", help="where the ONNX versions go (default: a temporary folder)")
    p.add_argument("--warmup", type=int, default=240, help="steps of random P x K batches")
    p.add_argument("--steps", type=int, default=960, help="steps of neighbour-class batches")
    p.add_argument("--refresh", type=int, default=300, help="publish and activate every N steps")
    p.add_argument("--classes", type=int, default=24, help="P: classes per batch")
    p.add_argument("--per-class", type=int, default=4, help="K: items per class")
    p.add_argument("--neighbours", type=int,
                   help="neighbour classes per batch (default (P - 1) // 2)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--aug-prob", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="PyTorch threads (leave the daemon cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.refresh < 1 or args.steps < 1:
        p.error("--steps and --refresh must be at least 1")
    return args


def main(argv=None):
    import likeness
    args = parse_args(argv)
    daemon = None if args.address else experiment.Daemon(args.binary)
    try:
        with likeness.Client(args.address or daemon.address, timeout=600) as client:
            client.wait_ready(60)
            cpu0 = daemon.cpu_seconds() if daemon else None
            res = run(client, args)
            report(res, daemon.cpu_seconds() - cpu0 if daemon else None)
            return res
    finally:
        if daemon is not None:
            daemon.stop()


if __name__ == "__main__":
    main()
