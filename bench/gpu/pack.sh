#!/usr/bin/env bash
# bench/gpu/pack.sh [DEST]: what bench/gpu/run.sh needs on a GPU machine that cannot reach the network.
#   DEST/llama.cpp.tar.xz  the llama.cpp the project builds on the CPU (backends/launchers/llama_build.py:
#                          vendor/llama.cpp of the llama-cpp-python sdist), without models/, docs/, tests/,
#                          examples/ and the converters: about 8 MB instead of 176 MB
#   DEST/whl/              the project's runtime dependencies as wheels for CPython 3.12 on x86-64 Linux, at
#                          the versions of the local venv, minus what that machine's image already has; py-spy
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

# The gateway's runtime dependencies (the closure of kimi-gateway's requirements in the local venv, no extras),
# pinned to what that venv runs, minus what the device image already holds (KINDS.md "Python packages already
# there; typing-extensions travels anyway: pydantic-core needs a recent one), plus py-spy for the profile.
ON_IMAGE="annotated-doc anyio certifi charset-normalizer click h11 httpcore httpx idna numpy packaging
prometheus-client protobuf pygments pyyaml requests rich scipy setuptools urllib3 uvloop zipp"
mapfile -t specs < <("$VENV_PY" - $ON_IMAGE <<'PY'
import re, sys
from importlib import metadata
from packaging.requirements import Requirement
skip = {re.sub(r"[-_.]+", "-", n).lower() for n in sys.argv[1:]}
seen, todo = {}, ["kimi-gateway"]
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    dist = metadata.distribution(name)
    seen[name] = dist.version
    for text in dist.requires or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
for name, version in sorted(seen.items()):
    if name not in skip and name != "kimi-gateway":
        print(f"{name}=={version}")
PY
)
specs+=("py-spy")
echo "wheels: ${specs[*]}"
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
  platforms+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$DEST/whl" "${specs[@]}"
du -sh "$DEST/llama.cpp.tar.xz" "$DEST/whl"
