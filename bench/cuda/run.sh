#!/usr/bin/env bash
# The CUDA check and benchmark, for a machine with an NVIDIA GPU (docs/benchmarks.md,
# "CUDA"). Needs: BIN (a folder with release builds of likeness and likeness-bench),
# ORT (a folder with libonnxruntime.so.1.31.1 and its CUDA provider, from the
# onnxruntime-gpu 1.31.1 wheel), CUDA 13 and cuDNN 9 libraries (found under LIBS, by
# default the Python packages nvidia-*), python3 with numpy and Pillow. OUT: where the
# log and the vectors go. DEVICE=cpu runs the same steps on CPU alone (a dry run).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${BIN:?}" "${ORT:?}" "${OUT:?}"
DEVICE=${DEVICE:-cuda:0}
LIBS=${LIBS:-/}
export LIKENESS_ORT_DYLIB=$ORT/libonnxruntime.so.1.31.1 CUDA_MODULE_LOADING=LAZY
if [ "$DEVICE" != cpu ]; then
    dirs=$(find $LIBS \( -path /proc -o -path /sys -o -path /dev \) -prune -o \( -name 'libcudart.so.13*' -o -name 'libcublas.so.13*' -o -name 'libcublasLt.so.13*' \
        -o -name 'libcurand.so.10*' -o -name 'libcufft.so.12*' -o -name 'libcudnn.so.9*' -o -name 'libnvrtc.so.13*' \) \
        -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
    export LD_LIBRARY_PATH=$ORT:$dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
nproc; grep -m1 'model name' /proc/cpuinfo
work=$(mktemp -d)
fx=tests/fixtures/fmnist
for part in enrol:enrol_images clean:query_clean_images reid:query_reid_images; do
    python3 bench/cuda/pngs.py $fx/${part#*:}.npy $work/${part%%:*} || exit 1
done

# serve NAME DEVICE PORT [FLAGS...]: a daemon in the background, ready when this returns.
serve() {
    local name=$1 dev=$2 port=$3
    shift 3
    $BIN/likeness serve --listen 127.0.0.1:$port --metrics-listen 127.0.0.1:$((port + 1000)) \
        --data-dir $work/data-$name --device $dev "$@" >$OUT/daemon-$name.log 2>&1 &
    for _ in $(seq 1 120); do
        $BIN/likeness collections list --addr http://127.0.0.1:$port >/dev/null 2>&1 && {
            grep -o 'loaded model.*' $OUT/daemon-$name.log | head -2
            return 0
        }
        sleep 0.5
    done
    echo "daemon $name did not start:"; tail -20 $OUT/daemon-$name.log; return 1
}
# embed PORT PART OUTNAME [FLAGS...]
embed() {
    local port=$1 part=$2 name=$3
    shift 3
    local t0=$(date +%s.%N)
    $BIN/likeness embed --addr http://127.0.0.1:$port --model fmnist-triplet "$@" --out $OUT/$name.npy $work/$part >/dev/null || return 1
    echo "$name: $(python3 -c "print(f'{$(date +%s.%N) - $t0:.2f} s')")"
}

echo "== correctness: the same images on CPU and on $DEVICE"
serve cpu cpu 50061 || exit 1
serve gpu $DEVICE 50071 || exit 1
for part in enrol clean reid; do
    embed 50061 $part cpu-$part --batch 256 || exit 1
    embed 50071 $part cuda-$part --batch 256 || exit 1
done
embed 50071 reid cuda-reid-single --batch 1 --concurrency 64 || exit 1
[ "$DEVICE" != cpu ] && nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
curl -s http://127.0.0.1:51071/metrics | grep -E '^likeness_embed' | head -20
python3 bench/cuda/check.py $OUT $fx
check=$?
kill $(jobs -p) 2>/dev/null; wait

echo "== cold start of the batch shapes: 400 images, one per request from 64 clients, on a fresh daemon"
for search in heuristic exhaustive; do
    serve cold-$search $DEVICE 50081 --cuda-conv-search $search || exit 1
    embed 50081 reid cold-$search --batch 1 --concurrency 64
    embed 50081 reid warm-$search --batch 1 --concurrency 64
    kill $(jobs -p) 2>/dev/null; wait
done

echo "== padded batches (--embed-pad, on by default on CUDA) against unpadded, max batch 64"
many=$(for _ in $(seq 1 100); do echo -n "$work/reid "; done)
for pad in false true; do
    serve pad-$pad $DEVICE 50091 --embed-pad $pad >/dev/null || exit 1
    for bc in 512:8 64:16 8:64 1:64 1:1; do
        imgs=$many
        [ $bc = 1:1 ] && imgs="$work/reid $work/reid $work/reid $work/reid $work/reid"
        echo -n "pad $pad, batch ${bc%:*} x ${bc#*:} in flight: "
        $BIN/likeness embed --addr http://127.0.0.1:50091 --model fmnist-triplet --batch ${bc%:*} \
            --concurrency ${bc#*:} --out $work/pad-$bc.npy $imgs 2>&1 | grep -o '[0-9]* images/s'
    done
    python3 -c "import numpy as np; a, b = np.load('$work/pad-512:8.npy'), np.load('$work/pad-1:64.npy'); print('  the same images in batches of 512 and of 1: max |diff|', float(np.abs(a - b).max()))"
    curl -s http://127.0.0.1:51091/metrics | grep -E 'likeness_embed_inference_seconds_(sum|count)' | grep triplet | tr '\n' ' '; echo
    kill $(jobs -p) 2>/dev/null; wait
done

bench() {
    timeout 240 $BIN/likeness-bench --daemon $BIN/likeness --only embed --runs 3 \
        --embed-model models/fmnist-triplet/model.toml --embed-images $fx/enrol_images.npy "$@"
}
if [ "$DEVICE" != cpu ]; then
    echo "== benchmark on CUDA"
    bench --embed-ref-device $DEVICE --daemon-arg=--device=$DEVICE
fi
echo "== benchmark on CPU"
bench --embed-ref-device cpu --daemon-arg=--device=cpu
exit $check
