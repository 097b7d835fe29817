"""A real daemon for the tests: the likeness binary on 127.0.0.1:0 with a temp data dir.

The binary is $LIKENESS_BIN, else the newer of debug/likeness (what `cargo test`
builds) and release/likeness under cargo's target directory ($CARGO_TARGET_DIR, else
target/ at the repository's root). The daemon logs JSON;
the fixture reads the bound address from its "listening" line and waits until
likeness.v1.Items reports SERVING.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

import likeness

REPO = Path(__file__).resolve().parents[3]


def daemon_binary() -> Path:
    given = os.environ.get("LIKENESS_BIN")
    if given:
        return Path(given)
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    built = [target / p / "likeness" for p in ("debug", "release")]
    built = [b for b in built if b.is_file()]
    if not built:
        pytest.exit(
            f"no likeness binary under {target}: run `cargo build --bin likeness` "
            "(or set LIKENESS_BIN)",
            returncode=2,
        )
    return max(built, key=lambda b: b.stat().st_mtime)


class Daemon:
    def __init__(self, binary: Path, data_dir: Path, extra: Sequence[str] = ()):
        self.log: list[str] = []
        self.proc = subprocess.Popen(
            [
                str(binary),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(data_dir),
                "--log-format",
                "json",
                "--log",
                "info,ort=warn",
                "--shutdown-grace-secs",
                "2",
                # A port of its own: another daemon on this machine may hold 9090.
                *([] if "--metrics-listen" in extra else ["--metrics-listen", "127.0.0.1:0"]),
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._bound = threading.Event()
        self.address = ""
        # Drains stderr for the daemon's whole life, so a chatty log never blocks it.
        threading.Thread(target=self._read, daemon=True).start()
        if not self._bound.wait(60):
            self.stop()
            raise RuntimeError(
                "the daemon did not report its address:\n" + "\n".join(self.log[-30:])
            )

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            if not self._bound.is_set():
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                if fields.get("message") == "listening":
                    self.address = fields["addr"]
                    self._bound.set()
        self._bound.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    d = Daemon(daemon_binary(), tmp_path_factory.mktemp("likeness-data"))
    yield d
    d.stop()
    assert d.proc.returncode == 0, "the daemon did not stop cleanly:\n" + "\n".join(d.log[-30:])


@pytest.fixture(scope="session")
def client(daemon):
    with likeness.Client(daemon.address, timeout=60) as c:
        c.wait_ready(60)
        yield c


_names = iter(range(1_000_000))


@pytest.fixture
def name(request):
    """A fresh collection name per test."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name[:40]) + f"-{next(_names)}"


def clustered(labels: int, per_label: int, dim: int, spread: float = 0.15, seed: int = 0):
    """per_label noisy copies of `labels` random unit centres: (ids, vectors, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(labels, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors, names, ids = [], [], []
    for c in range(labels):
        for j in range(per_label):
            vectors.append(centres[c] + spread * rng.normal(size=dim))
            names.append(f"class-{c}")
            ids.append(f"item-{c}-{j}")
    return ids, np.asarray(vectors, dtype=np.float32), names


@pytest.fixture(scope="session")
def labelled(client):
    """A cosine collection of 8 labels x 30 items, 16-d, shared by the mining tests."""
    ids, vectors, labels = clustered(8, 30, 16, seed=1)
    client.create_collection("labelled", 16, "cosine")
    client.upsert("labelled", ids, vectors, labels=labels)
    return "labelled", ids, vectors, labels


@pytest.fixture(scope="session")
def classes40(client):
    """A cosine collection of 40 labels x 8 items, 16-d, for the class-batch tests (read
    only: tests that write use a collection of their own)."""
    ids, vectors, labels = clustered(40, 8, 16, seed=4)
    client.create_collection("classes40", 16, "cosine")
    client.upsert("classes40", ids, vectors, labels=labels)
    return "classes40", ids, vectors, labels
