#!/usr/bin/env bash
# bench/gpu/pack.sh [DEST]: what bench/gpu/run.sh needs on a GPU machine that cannot reach the network.
#   DEST/llama.cpp.tar.xz  the llama.cpp the project builds on the CPU (backends/launchers/llama_build.py:
#                          vendor/llama.cpp of the llama-cpp-python sdist), without models/, docs/, tests/,
#                          examples/ and the converters: about 8 MB instead of 176 MB
#   DEST/whl/              the project's runtime dependencies as wheels for CPython 3.12 on x86-64 Linux, at
#                          the versions of the local venv, minus what that machine's image already has
# Run here (with the network), from the repo root; DEST defaults to .gpu (add /.gpu/ to .git/info/exclude).
set -euo pipefail
DEST=${1:-.gpu}
PY=${KIMI_GPU_PYTHON:-$(command -v python3)}
VENV_PY=${KIMI_BENCH_PYTHON:-.venv/bin/python}
SDIST=$("$PY" -c 'import re,sys; print(re.search(r"\"KIMI_GATEWAY_LLAMA_SDIST_VERSION\", \"([^\"]+)\"", open("backends/launchers/llama_build.py").read()).group(1))')
mkdir -p "$DEST/whl"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$SDIST" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(echo "$tmp"/llama_cpp_python-*/vendor)
(cd "$src/llama.cpp" && rm -rf models docs media benches tests examples conversion gguf-py)  # scripts/: the build needs ui-assets.cmake
tar cJf "$DEST/llama.cpp.tar.xz" -C "$src" llama.cpp

# Not on the image (KINDS.md lists what is): pinned to what the project's venv runs here.
names="fastapi starlette uvicorn httptools pydantic pydantic_core annotated-types typing-inspection tenacity orjson
gguf typing_extensions opentelemetry-api"
specs=()
for name in $names; do
  version=$("$VENV_PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')
  specs+=("$name${version:+==$version}")
done
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$DEST/whl" "${specs[@]}"
du -sh "$DEST/llama.cpp.tar.xz" "$DEST/whl"
