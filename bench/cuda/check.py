"""Compares embeddings written by `likeness embed` on CPU and on CUDA (bench/cuda/run.sh).

Checks, each printed with its number and failing the run when off:
- CUDA against CPU, image by image (cosine and largest difference);
- the first 16 enrol images against the fixture's reference (ONNX Runtime on CPU);
- one image per request from 64 concurrent clients (the daemon's dynamic batches of any
  size) against whole batches of 256, on CUDA;
- recall@1 of the re-identification queries against the enrolled images, on CUDA, equal
  to the fixture's figure for the shipped model.
"""

import json
import sys

import numpy as np

out, fixtures = sys.argv[1], sys.argv[2]
fail = []


def load(name):
    return np.load(f"{out}/{name}.npy")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def check(what, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    if not ok:
        fail.append(what)


for part in ["enrol", "clean", "reid"]:
    cpu, cuda = load(f"cpu-{part}"), load(f"cuda-{part}")
    check(f"{part}: same shape", cpu.shape == cuda.shape, f"{cpu.shape} vs {cuda.shape}")
    cos = np.sum(unit(cpu) * unit(cuda), axis=1)
    diff = np.abs(cpu - cuda).max()
    check(f"{part}: CUDA = CPU", cos.min() > 0.9999 and diff < 1e-3,
          f"min cosine {cos.min():.7f}, max |diff| {diff:.2e} over {len(cpu)} images")

ref = np.load(f"{fixtures}/reference_embeddings.npy")
cuda = load("cuda-enrol")[: len(ref)]
diff = np.abs(ref - cuda).max()
check("CUDA = the fixture's reference", diff < 1e-3, f"max |diff| {diff:.2e} over {len(ref)} images")

single, batched = load("cuda-reid-single"), load("cuda-reid")
diff = np.abs(single - batched).max()
check("64 clients x 1 image = batches of 256 (CUDA)", diff < 1e-3, f"max |diff| {diff:.2e}")

expected = json.load(open(f"{fixtures}/expected.json"))
enrol_labels = np.load(f"{fixtures}/enrol_labels.npy")
query_labels = np.load(f"{fixtures}/query_labels.npy")
for part, key in [("clean", "model_clean"), ("reid", "model_reid")]:
    q, e = unit(load(f"cuda-{part}")), unit(load("cuda-enrol"))
    nearest = np.argmax(q @ e.T, axis=1)
    recall = float(np.mean(enrol_labels[nearest] == query_labels))
    want = expected[key]["recall_at_1"]
    check(f"recall@1 {part} on CUDA", abs(recall - want) < 0.0051,
          f"{recall:.4f} (the fixture's, from ONNX Runtime on CPU: {want})")

print("CUDA CHECK", "FAILED: " + ", ".join(fail) if fail else "PASSED")
sys.exit(1 if fail else 0)
