#!/usr/bin/env bash
# The build steps of deploy/Dockerfile and deploy/Dockerfile.cuda, kept here so that
# the same commands run in CI without a container runtime (tests/it/deploy.rs).
#
#   image.sh ort PACKAGE DEST    ONNX Runtime's shared libraries from the PyPI wheel
#                                PACKAGE (onnxruntime or onnxruntime-gpu), into DEST
#   image.sh models SRC DEST     the shipped models (model.toml and .onnx files) of
#                                the checkout SRC, into DEST/<name>/
#   image.sh stubs DIR           empty crate targets in DIR, so that the dependencies
#                                build (and cache as a layer) before the sources come
set -euo pipefail

ORT_VERSION=1.31.1
# sha256 of onnxruntime/capi/libonnxruntime.so.1.31.1 in the CPU wheel (as build.rs).
ORT_CPU_SHA256=fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3
# sha256 of onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_28_x86_64.whl, the wheel pip
# picks on CPython 3.11 (the images' python stage). Built for CUDA 13 and cuDNN 9.
ORT_GPU_WHEEL_SHA256=e26c475fe361b2015f45b4b824bd13f0bb20204e59b62814e6f0acd5f3d491a6

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

die() {
    echo "image.sh: $*" >&2
    exit 1
}

ort() {
    local package=$1 dest=$2 wheels
    case $package in
        onnxruntime | onnxruntime-gpu) ;;
        *) die "ort: unknown package $package (onnxruntime or onnxruntime-gpu)" ;;
    esac
    wheels=$WORK/wheels
    mkdir -p "$wheels"
    local pin=()
    if [[ $package == onnxruntime-gpu ]]; then
        # pip checks the wheel itself; the CPU library is checked after extraction.
        echo "$package==$ORT_VERSION --hash=sha256:$ORT_GPU_WHEEL_SHA256" >"$wheels/pin.txt"
        pin=(--require-hashes -r "$wheels/pin.txt")
    else
        pin=("$package==$ORT_VERSION")
    fi
    python3 -m pip download --quiet --disable-pip-version-check --no-deps \
        --only-binary=:all: --dest "$wheels" "${pin[@]}"
    mkdir -p "$dest"
    # The wheel is a zip. Take the libraries (libonnxruntime and, in the GPU wheel, the
    # CUDA and TensorRT providers it loads from its own folder), not the Python module.
    python3 - "$wheels" "$dest" <<'PY'
import glob, os, shutil, sys, zipfile
wheels, dest = sys.argv[1:]
(wheel,) = glob.glob(os.path.join(wheels, "*.whl"))
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist()
             if n.startswith("onnxruntime/capi/lib") and ".so" in n]
    if not names:
        sys.exit(f"{wheel}: no onnxruntime/capi/lib*.so*")
    for n in names:
        with z.open(n) as src, open(os.path.join(dest, os.path.basename(n)), "wb") as dst:
            shutil.copyfileobj(src, dst)
        print(os.path.basename(n))
PY
    local lib="$dest/libonnxruntime.so.$ORT_VERSION"
    [[ -f $lib ]] || die "ort: the wheel had no libonnxruntime.so.$ORT_VERSION"
    if [[ $package == onnxruntime ]]; then
        local got
        got=$(sha256sum "$lib" | cut -d' ' -f1)
        [[ $got == "$ORT_CPU_SHA256" ]] || die "ort: $lib has sha256 $got, expected $ORT_CPU_SHA256"
    fi
}

models() {
    local src=$1 dest=$2 dir name n=0
    for dir in "$src"/models/*/; do
        [[ -f $dir/model.toml ]] || continue
        name=$(basename "$dir")
        mkdir -p "$dest/$name"
        cp "$dir"/model.toml "$dir"/*.onnx "$dest/$name/"
        n=$((n + 1))
    done
    ((n > 0)) || die "models: no models/*/model.toml under $src"
}

stubs() {
    local dir=$1
    mkdir -p "$dir/src/bin/likeness-bench"
    : >"$dir/src/lib.rs"
    echo 'fn main() {}' >"$dir/src/main.rs"
    echo 'fn main() {}' >"$dir/src/bin/likeness-bench/main.rs"
}

case ${1:-} in
    ort) [[ $# == 3 ]] || die "usage: image.sh ort PACKAGE DEST"; ort "$2" "$3" ;;
    models) [[ $# == 3 ]] || die "usage: image.sh models SRC DEST"; models "$2" "$3" ;;
    stubs) [[ $# == 2 ]] || die "usage: image.sh stubs DIR"; stubs "$2" ;;
    *) die "usage: image.sh ort|models|stubs ..." ;;
esac
