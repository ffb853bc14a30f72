#!/usr/bin/env bash
# Fills .gpu/ (git-ignored) with what the GPU machine lacks for docs/gpu-hot-loop.md, on the development machine
# and before asking for the device: the default model's tokenizer, llama-cpp-python's source stripped to what its
# build needs, and wheels of the Python packages missing there. About 20 MB; all of it travels with `carry: [".gpu"]`.
#
#   bash docs/gpu-hot-loop-kit.sh            # GPU_PYTHON=3.12 by default: the GPU image's python3
set -euo pipefail
cd "$(dirname "$0")/.."
py=${GPU_PYTHON:-3.12}
kit=.gpu
rm -rf "$kit" && mkdir -p "$kit/wheels"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python -m edge_adapt.bench.random_model "$kit/tokenizer.gguf" --save-tokenizer

# llama-cpp-python comes as a source archive of about 76 MB, over what travels; its test vocabularies, docs and
# web UI are not needed to build it (../shared/gpu/README.md).
version=$(python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
tar xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp"
(cd "$tmp/llama_cpp_python-$version" && rm -rf .git vendor/llama.cpp/models/*.gguf vendor/llama.cpp/docs \
  vendor/llama.cpp/media vendor/llama.cpp/tools/server/public*)
tar czf "$kit/lcp-stripped.tar.gz" -C "$tmp" "llama_cpp_python-$version"

# The GPU image has numpy, jinja2, rich, pyyaml, requests, tqdm, shellingham, annotated-doc and typing-extensions
# (../.library/device/KINDS.md); these it lacks, or may hold at another version than the one tested here. Pinned to
# this environment's versions, one of each (two versions of one package stop the install there).
pins=$(python - <<'PY'
import importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in
               ("diskcache", "gguf", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typer")))
PY
)
# shellcheck disable=SC2086
pip download -q --no-deps --only-binary :all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$kit/wheels" $pins
ls -sh "$kit" "$kit/wheels"
du -sh "$kit"
