#!/usr/bin/env python3
"""Draws the curve part's CSV (likeness-bench --only curve) as PNGs in docs/.

One figure per data set: on the left the ann-benchmarks picture (recall@10 on x, QPS on
a log y, one point per ef), on the right the server CPU per query against ef, with
usearch's own CPU per query plus the fixed cost of a gRPC call as the line to stay
within 1.1x of.

    pip install matplotlib
    python3 bench/plot_curve.py [docs/search-curve.csv] [docs/]

It also prints the equal-recall table of docs/benchmarks.md (QPS and CPU ratios at
recall 0.9, 0.95 and 0.99).
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "likeness-grpc": "likeness over gRPC",
    "usearch": "usearch in-process",
    "usearch-daemon-way": "usearch, asked as the daemon asks",
}
STYLE = {
    "likeness-grpc": dict(color="tab:blue", marker="o"),
    "usearch": dict(color="tab:orange", marker="s"),
    "usearch-daemon-way": dict(color="tab:orange", marker="x", linestyle="--"),
}


def load(path):
    """{dataset: {system: [row, ...] sorted by ef}}"""
    data = defaultdict(lambda: defaultdict(list))
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key in ("recall", "qps", "server_cpu_us", "grpc_floor_cpu_us"):
                row[key] = float(row[key])
            row["ef"] = int(row["ef"])
            data[row["dataset"]][row["system"]].append(row)
    for systems in data.values():
        for rows in systems.values():
            rows.sort(key=lambda r: r["ef"])
    return data


def plot(dataset, systems, out_dir):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for system in ("usearch", "usearch-daemon-way", "likeness-grpc"):
        rows = systems.get(system)
        if not rows:
            continue
        if system != "usearch-daemon-way":
            left.plot(
                [r["recall"] for r in rows],
                [r["qps"] for r in rows],
                label=LABELS[system],
                **STYLE[system],
            )
            for r in rows:
                left.annotate(
                    str(r["ef"]),
                    (r["recall"], r["qps"]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                    color=STYLE[system]["color"],
                )
        right.plot(
            [r["ef"] for r in rows],
            [r["server_cpu_us"] for r in rows],
            label=LABELS[system] + (" (daemon CPU)" if system == "likeness-grpc" else ""),
            **STYLE[system],
        )
    own = systems.get("usearch", [])
    if own:
        floor = own[0]["grpc_floor_cpu_us"]
        efs = [r["ef"] for r in own]
        bound = [1.1 * (r["server_cpu_us"] + floor) for r in own]
        right.plot(efs, bound, color="grey", linestyle=":", label="1.1 x (usearch + gRPC floor)")
    left.set_yscale("log")
    left.set_xlabel("recall@10")
    left.set_ylabel("queries per second (log)")
    left.set_title(f"{dataset}: recall against QPS (labels: ef)")
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xlabel("ef")
    right.set_ylabel("CPU µs per query")
    right.set_title(f"{dataset}: CPU per query")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_dir) / f"search-curve-{dataset}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(out)


def cheapest(rows, level):
    """The row with the smallest ef whose recall reaches level, or None."""
    ok = [r for r in rows if r["recall"] >= level]
    return min(ok, key=lambda r: r["ef"]) if ok else None


def equal_recall_table(data):
    """Markdown: likeness over gRPC against usearch in-process at recall 0.9, 0.95, 0.99.

    Two ratios per cell: measured QPS (both sides in the same run; on a shared machine
    the in-process side's 2 threads lose more to other tenants than the daemon's many
    threads do), and CPU capacity, cores / CPU per query, where the daemon's query costs
    its own CPU plus its gRPC client's, since the bench's clients share the cores."""
    lines = [
        "| data | recall | usearch ef, QPS, CPU µs/q | likeness ef, QPS, daemon + client CPU µs/q | QPS ratio | CPU capacity ratio |",
        "|---|---|---|---|---|---|",
    ]
    for dataset, systems in data.items():
        for level in (0.9, 0.95, 0.99):
            u = cheapest(systems.get("usearch", []), level)
            g = cheapest(systems.get("likeness-grpc", []), level)
            if not u or not g:
                lines.append(f"| {dataset} | {level} | - | - | not reached | - |")
                continue
            g_cpu = g["server_cpu_us"] + float(g["client_cpu_us"])
            lines.append(
                f"| {dataset} | {level} | {u['ef']}, {u['qps']:.0f}, {u['server_cpu_us']:.0f} "
                f"| {g['ef']}, {g['qps']:.0f}, {g['server_cpu_us']:.0f} + {float(g['client_cpu_us']):.0f} "
                f"| {g['qps'] / u['qps']:.2f}x | {u['server_cpu_us'] / g_cpu:.2f}x |"
            )
    return "\n".join(lines)


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "docs/search-curve.csv"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else "docs"
    data = load(src)
    for dataset, systems in data.items():
        if "likeness-grpc" in systems:
            plot(dataset, systems, out_dir)
    print(equal_recall_table(data))


if __name__ == "__main__":
    main()
