#!/usr/bin/env bash
# On the GPU machine, from the repository root (the kit from docs/gpu-hot-loop-kit.sh carried in .gpu/): builds
# llama-cpp-python with CUDA, makes the random-weight models and runs the measurements of docs/gpu-hot-loop.md.
# The build takes minutes, so it is started in the background and polled (see that page). The results go to
# /tmp/gpu-hot-loop, not to $OUT, which is emptied before each command: a poll copies them there.
#
# Settings, for a dry run on a CPU machine: CMAKE_ARGS (default: CUDA for Hopper), DEVICE (cuda), SHAPES
# ("smollm2-135m llama-1b"), REPEATS (2).
set -euo pipefail
res=/tmp/gpu-hot-loop
rm -rf "$res" /tmp/site /tmp/lcp && mkdir -p "$res" /tmp/site /tmp/lcp
exec > "$res/log" 2>&1
trap 'rc=$?; echo "== $(date +%T) exit $rc"; touch "$res/done"' EXIT  # a poll stops waiting on a failure too
root=$PWD
device=${DEVICE:-cuda}
repeats=${REPEATS:-2}
step() { echo "== $(date +%T) $*"; }
show() { python3 -c 'import json, sys; from edge_adapt import bench; print(bench.render(json.load(open(sys.argv[1]))))' "$1"; }

step install the kit\'s wheels
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
step build llama-cpp-python: "${CMAKE_ARGS:=-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90}"
tar xzf .gpu/lcp-stripped.tar.gz -C /tmp/lcp
(cd /tmp/lcp/llama_cpp_python-* && CMAKE_ARGS=$CMAKE_ARGS CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .)
export PYTHONPATH=/tmp/site:$root PYTHONUNBUFFERED=1

# The device's numbers first, the CPU's last: if time runs out, what is left is the CPU baseline.
for shape in ${SHAPES:-smollm2-135m llama-1b}; do
  step model "$shape"
  python3 -m edge_adapt.bench.random_model "/tmp/$shape.gguf" --shape "$shape" --tokenizer .gpu/tokenizer.gguf --force
  step engine vs raw, step profile, clients vs forks: "$shape" on "$device"
  python3 -m edge_adapt bench -m "/tmp/$shape.gguf" --only raw --only profile --only clients --device "$device" \
    --repeats "$repeats" --json > "$res/raw-$shape.json"
  show "$res/raw-$shape.json"
done
last=/tmp/${shape}.gguf
step "16 samples batched vs one after another: $shape on $device, then on the cpu"
python3 -m edge_adapt bench -m "$last" --only batched --device "$device" --repeats "$repeats" --json \
  > "$res/batched-$device.json"
show "$res/batched-$device.json"
python3 -m edge_adapt bench -m "$last" --only batched --device cpu --repeats "$repeats" --json > "$res/batched-cpu.json"
show "$res/batched-cpu.json"
