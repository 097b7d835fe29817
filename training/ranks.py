"""Two or more trainer ranks (torch.distributed, gloo, on CPU) on the CJK benchmark:
(b) of issue 17. Each rank forwards its own P x K batch, the ranks average their
gradients every step (what DistributedDataParallel does), and one network results.

The question is a memory's reach. An in-process cross-batch memory (XBM) lives in one
rank and sees only that rank's own past batches, unless the ranks exchange their
embeddings every step (all_gather); a likeness collection is one store that every rank
writes back to and mines from. The methods, each at the per-rank settings of
docs/experiment.md's 1,200-step runs:

  triplet-inbatch             in-batch semi-hard mining per rank, no memory
  xbm                         + an XBM queue per rank holding only its own batches
  xbm-gather                  + an XBM queue per rank fed with every rank's batches
                              (all_gather of embeddings, labels and ids each step),
                              the same size: the in-process way to share a memory
  likeness-memory             + the Session's stored negatives of one shared
                              collection that every rank writes back to, with the
                              same age bound as the queues (min_generation)
  likeness-batches-activate   neighbour-class batches from the shared collection,
                              each rank mining its own shard of the items; rank 0
                              publishes and activates each version of the network

Every rank is its own process on the same machine as the daemon; rank 0 evaluates.

    OMP_NUM_THREADS=1 python3 ranks.py --seeds 0 1 2 --out results/cjk-ranks.json
    python3 ranks.py --report results/cjk-ranks.json
"""

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import experiment as ex  # noqa: E402

METHODS = ("triplet-inbatch", "xbm", "xbm-gather", "likeness-memory",
           "likeness-batches-activate")
# docs/experiment.md's 1,200-step settings, per rank
SETTINGS = ["--benchmark", "cjk", "--steps", "1200", "--eval-every", "150",
            "--pk-classes", "24", "--warmup", "240", "--refresh", "300",
            "--memory", "16384"]


class RankRun(ex.Run):
    """One rank's share of a run: its own batches (seeded by rank), gradients averaged
    over the ranks before each optimiser step, the collection shared."""

    def __init__(self, bench, label, seed, args, client, rank, world, tag):
        import torch
        import torch.distributed as dist
        self.dist, self.rank, self.world = dist, rank, world
        self.gather = label == "xbm-gather"
        method = "xbm" if self.gather else label
        super().__init__(bench, method, seed, args, client, None, log=print)
        self.tag = tag  # one collection (and model) name for all ranks
        # The same initial weights on every rank (as DDP broadcasts them); batches,
        # augmentation and mining seeds differ by rank.
        with torch.no_grad():
            for p in self.model.state_dict().values():
                dist.broadcast(p, 0)
        self.rng = np.random.default_rng([seed, rank])
        self.gen = torch.Generator().manual_seed(seed * 1000 + rank)
        params = [p for g in self.opt.param_groups for p in g["params"]]

        def average_gradients(_opt, _args, _kwargs):
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            i = 0
            for g in grads:
                g.copy_(flat[i:i + g.numel()].view_as(g))
                i += g.numel()

        self.opt.register_step_pre_hook(average_gradients)

    # ---- the shared collection
    def create_training_collection(self):
        self.collection = self.collection_name()
        if self.rank == 0:
            self.client.create_collection(self.collection, ex.fc.EMBED_DIM, "l2")
        self.dist.barrier()

    def drop_training_collection(self):
        self.dist.barrier()  # every rank's streams closed
        if self.rank == 0:
            self.client.delete_collection(self.collection)

    # ---- xbm-gather: every rank's batch into every rank's queue
    def memory_add(self, emb, labels, idx):
        if not self.gather:
            return super().memory_add(emb, labels, idx)
        torch = self.torch
        parts = [torch.cat([emb, labels[:, None].to(emb.dtype),
                            torch.from_numpy(idx.astype(np.float32))[:, None]], 1)]
        everyone = [torch.empty_like(parts[0]) for _ in range(self.world)]
        self.dist.all_gather(everyone, parts[0])
        for t in everyone:  # ids and labels are exact in float32 (< 2^24)
            self.queue.add(t[:, :-2], t[:, -2].long(), t[:, -1].long().numpy())

    # ---- likeness-batches-activate: rank 0 publishes and activates, all ranks mine
    def start_model(self):
        if self.rank == 0:
            super().start_model()
        else:
            from concurrent.futures import ThreadPoolExecutor
            self.collection = self.collection_name()
            self.act = {"model": self.collection, "dir": tempfile.mkdtemp(prefix="likeness-act-"),
                        "next_version": 1, "pending": None, "activated": 0,
                        "last_poll": 0.0, "pool": ThreadPoolExecutor(1), "enrol": None,
                        "check_model": None,
                        "log": {"export_seconds": 0.0, "publish_seconds": 0.0,
                                "activate_call_seconds": 0.0, "wait_seconds": 0.0,
                                "poll_seconds": 0.0, "polls": 0, "enrol_seconds": None,
                                "enrol_wait_seconds": 0.0, "activations": [],
                                "first_neighbour_step": None, "check_max_abs_diff": None}}
        self.dist.barrier()  # the collection exists

    def publish_version(self):
        if self.rank == 0:
            return super().publish_version()
        version = str(self.act["next_version"])
        self.act["next_version"] += 1
        return version

    def activate_version(self, version):
        if self.rank == 0:
            super().activate_version(version)
        self.dist.barrier()  # no rank polls for a version not yet activated


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights_spread(run):
    """Largest difference between any rank's parameters and rank 0's (0: the ranks
    trained one network)."""
    torch, dist = run.torch, run.dist
    flat = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(run.world)]
    dist.all_gather(everyone, flat)
    return float(max((t - everyone[0]).abs().max() for t in everyone))


def rank_main(rank, world, port, label, seed, argv, address, tag, out_dir, bench=None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    import likeness
    args = ex.parse_args(argv)
    if rank != 0:
        args.eval_every = 0  # rank 0 draws the learning curve
    if bench is None:
        bench = ex.load_benchmark(args)
    client = likeness.Client(address, timeout=120)
    try:
        run = RankRun(bench, label, seed, args, client, rank, world, tag)
        curve, info = run.train()
        info["weights_max_diff_across_ranks"] = weights_spread(run)
        out = {"rank": rank, "info": info}
        if rank == 0:
            out["curve"] = curve
            out["test"] = run.evaluate()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(out, fh)
        dist.barrier()
    finally:
        client.close()
        dist.destroy_process_group()


def run_one(label, seed, ranks, argv, address, daemon_cpu=lambda: 0.0, bench=None):
    """One run of `label` over `ranks` processes against the daemon at `address`, with
    the experiment's options `argv` (and `bench` instead of the CJK benchmark)."""
    import torch.multiprocessing as mp
    out_dir = tempfile.mkdtemp(prefix="likeness-ranks-")
    world = ranks
    try:
        d0 = daemon_cpu()
        t = time.perf_counter()
        mp.spawn(rank_main, nprocs=world, join=True,
                 args=(world, free_port(), label, seed, argv, address,
                       f"{os.getpid()}r{seed}", out_dir, bench))
        wall = time.perf_counter() - t
        ranks = []
        for r in range(world):
            with open(os.path.join(out_dir, f"rank{r}.json")) as fh:
                ranks.append(json.load(fh))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    info = dict(ranks[0]["info"])
    info["trainer_cpu_seconds"] = float(sum(r["info"]["trainer_cpu_seconds"] for r in ranks))
    info["trainer_cpu_seconds_per_rank"] = [r["info"]["trainer_cpu_seconds"] for r in ranks]
    info["daemon_cpu_seconds"] = daemon_cpu() - d0
    info["run_wall_seconds"] = wall  # spawn to join, evaluation included
    info["memory_seconds_per_rank"] = [r["info"].get("round2", {}).get("memory_seconds")
                                       for r in ranks]
    return {"method": label, "seed": seed, "test": ranks[0]["test"], "info": info,
            "curve": ranks[0]["curve"]}


def report(res):
    print(f"\n### CJK, {res['settings']['ranks']} ranks x {res['settings']['steps']} steps\n")
    print(ex.table_round2(res))
    print()
    print(ex.paired_differences(res, baselines=("triplet-inbatch", "xbm", "xbm-gather")))
    rows = ex.per_method(res)
    print("\n| method | trainer CPU s (all ranks) | memory term s per rank | daemon CPU s | "
          "wall s per run |\n|---|---|---|---|---|")
    for m, rs in rows.items():
        mem = [np.mean([x for x in r["info"]["memory_seconds_per_rank"] if x is not None] or [0])
               for r in rs]
        print(f"| {m} | {np.mean([r['info']['trainer_cpu_seconds'] for r in rs]):.0f} | "
              f"{np.mean(mem):.0f} | {np.mean([r['info']['daemon_cpu_seconds'] for r in rs]):.0f}"
              f" | {np.mean([r['info']['run_wall_seconds'] for r in rs]):.0f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="override (smoke runs)")
    p.add_argument("--warmup", type=int, default=None, help="override (smoke runs)")
    p.add_argument("--out", help="results JSON (runs merge into it)")
    p.add_argument("--report", help="a results JSON: print its tables")
    a = p.parse_args()
    if a.report:
        with open(a.report) as fh:
            report(json.load(fh))
        return
    argv = list(SETTINGS)
    for flag, v in (("--steps", a.steps), ("--warmup", a.warmup), ("--refresh", a.warmup)):
        if v is not None:
            argv += [flag, str(v)]
    args = ex.parse_args(argv)
    args.ranks = a.ranks
    labels = [m for m in a.methods.split(",") if m]
    for m in labels:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}")
    settings = {k: getattr(args, k) for k in (
        "steps", "batch", "pk_classes", "refresh", "width", "lr", "aug_prob", "eval_every",
        "memory", "memory_weight", "memory_negatives", "warmup", "neighbours", "ranks")}
    result = {"benchmark": "cjk", "runs": {}}
    if a.out and os.path.exists(a.out):
        with open(a.out) as fh:
            result = json.load(fh)
    if result.get("settings", settings) != settings:
        raise SystemExit(f"{a.out} holds runs with other settings: {result['settings']}")
    result["settings"] = settings
    bench = ex.load_benchmark(args)
    test, val = bench["test"], bench["val"]
    result["pixels"] = ex.protocol_metrics(ex.pixels, test, val)
    import likeness
    daemon = ex.Daemon(args.binary)
    try:
        c = likeness.Client(daemon.address, timeout=60)
        c.wait_ready(60)
        c.close()
        for seed in a.seeds:
            for m in labels:
                r = run_one(m, seed, args.ranks, argv, daemon.address, daemon.cpu_seconds)
                result["runs"][f"{m}/{seed}"] = r
                print(json.dumps({"method": m, "seed": seed,
                                  "r1": [round(r["test"][k]["recall_at_1"], 4)
                                         for k in ("clean", "reid")],
                                  "cpu": round(r["info"]["trainer_cpu_seconds"], 1),
                                  "daemon_cpu": round(r["info"]["daemon_cpu_seconds"], 1),
                                  "wall": round(r["info"]["run_wall_seconds"], 1)}), flush=True)
                if a.out:
                    tmp = a.out + ".tmp"
                    with open(tmp, "w") as fh:
                        json.dump(result, fh)
                    os.replace(tmp, a.out)
    finally:
        daemon.stop()
    report(result)


if __name__ == "__main__":
    main()
