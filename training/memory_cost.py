#!/usr/bin/env python3
"""Where an in-process cross-batch memory and the daemon's cross over (issue 17, (a)).

Per training step, for a batch of 96 fresh 64-d embeddings against a memory of M
stored vectors (about 28 per class, as in the CJK training set):

* in-process: the memory term of experiment.py's xbm (semihard_ref_loss: one
  [96, M] distance product, a sort per row, binary searches), forward and backward,
  on one PyTorch thread; and, for small M only, pytorch-metric-learning's
  TripletMarginMiner + TripletMarginLoss with ref_emb, which builds a [96, M, M]
  triplet mask (CrossBatchMemory with a triplet loss does the same);
* daemon: one Session step of CollectionMemory (SEMI_HARD, 8 negatives and 1 positive
  per anchor, the stored vectors returned, the batch written back) against a
  collection of M items, round trip seen by the trainer, plus the trainer's own
  memory term over the refs it returns.

Random unit vectors stand in for embeddings (the cost does not depend on their
values, only the count of semi-hard triplets does a little).

  OMP_NUM_THREADS=1 python3 memory_cost.py --out results/memory-cost.json
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def unit(rng, n, d=64):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def time_it(fn, repeat):
    fn()  # warm
    t = []
    for _ in range(repeat):
        s = time.perf_counter()
        fn()
        t.append(time.perf_counter() - s)
    return float(np.median(t)) * 1000.0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+",
                   default=[4096, 16384, 44032, 131072, 262144])
    p.add_argument("--pml-sizes", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--per-class", type=int, default=28)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--binary", default=None)
    p.add_argument("--out")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    import experiment as ex
    from pytorch_metric_learning import losses, miners
    rng = np.random.default_rng(0)
    B = 96
    out = {"batch": B, "dim": 64, "per_class": args.per_class, "in_process": [],
           "pml": [], "daemon": []}

    for M in args.sizes:
        classes = max(2, M // args.per_class)
        mem = torch.from_numpy(unit(rng, M))
        mem_y = torch.from_numpy(rng.integers(0, classes, M))
        e0 = torch.from_numpy(unit(rng, B))
        y = mem_y[torch.from_numpy(rng.integers(0, M, B))]

        def step():
            e = e0.clone().requires_grad_(True)
            loss, _ = ex.semihard_ref_loss(e, y, mem, mem_y)
            loss.backward()
        ms = time_it(step, args.repeat)
        out["in_process"].append({"memory": M, "ms": ms})
        print(f"in-process memory term, M={M}: {ms:.1f} ms/step", flush=True)

    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    loss_fn = losses.TripletMarginLoss(margin=0.2)
    for M in args.pml_sizes:
        classes = max(2, M // args.per_class)
        mem = torch.from_numpy(unit(rng, M))
        mem_y = torch.from_numpy(rng.integers(0, classes, M))
        e0 = torch.from_numpy(unit(rng, B))
        y = mem_y[torch.from_numpy(rng.integers(0, M, B))]

        def step():
            e = e0.clone().requires_grad_(True)
            loss = loss_fn(e, y, miner(e, y, mem, mem_y), mem, mem_y)
            loss.backward()
        ms = time_it(step, max(3, args.repeat // 3))
        out["pml"].append({"memory": M, "ms": ms})
        print(f"pml miner + loss with ref_emb, M={M}: {ms:.1f} ms/step", flush=True)

    import likeness
    from likeness.torch import CollectionMemory
    daemon = ex.Daemon(args.binary or ex.default_binary())
    client = likeness.Client(daemon.address, timeout=300)
    client.wait_ready(60)
    try:
        for M in args.sizes:
            classes = max(2, M // args.per_class)
            vec = unit(rng, M)
            lab = rng.integers(0, classes, M)
            name = f"cost-{M}"
            client.create_collection(name, 64, "l2")
            t = time.perf_counter()
            client.upsert(name, [str(i) for i in range(M)], vec,
                          labels=[str(int(v)) for v in lab], generation=0, batch_size=4096)
            load_s = time.perf_counter() - t
            cpu0 = daemon.cpu_seconds()
            lat, term = [], []
            with CollectionMemory(client, name, "semi_hard", margin=0.2,
                                  negatives_per_anchor=8, positives_per_anchor=1) as cm:
                for s in range(args.repeat + 1):
                    ids = rng.choice(M, B, replace=False)
                    e = torch.from_numpy(unit(rng, B)).requires_grad_(True)
                    y = torch.from_numpy(lab[ids])
                    r = cm.step([str(int(i)) for i in ids], e,
                                [str(int(v)) for v in lab[ids]], s + 1)
                    t = time.perf_counter()
                    if len(r):
                        ref_idx = np.array([int(i) for i in r.ref_ids])
                        loss, _ = ex.semihard_ref_loss(e, y, r.ref_emb,
                                                       torch.from_numpy(lab[ref_idx]))
                        loss.backward()
                    if s:
                        lat.append(r.seconds * 1000.0)
                        term.append((time.perf_counter() - t) * 1000.0)
            d_cpu = (daemon.cpu_seconds() - cpu0) / (args.repeat + 1) * 1000.0
            client.delete_collection(name)
            row = {"memory": M, "session_ms_p50": float(np.median(lat)),
                   "session_ms_max": float(np.max(lat)),
                   "trainer_term_ms": float(np.median(term)),
                   "daemon_cpu_ms_per_step": d_cpu, "load_seconds": load_s}
            out["daemon"].append(row)
            print(f"daemon, M={M}: Session step {row['session_ms_p50']:.1f} ms p50, "
                  f"daemon CPU {d_cpu:.1f} ms/step, trainer's term over the refs "
                  f"{row['trainer_term_ms']:.1f} ms (load {load_s:.0f} s)", flush=True)
    finally:
        client.close()
        daemon.stop()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
