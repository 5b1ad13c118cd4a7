#!/usr/bin/env bash
# bench/gpu/run.sh: the whole GPU benchmark on a fresh machine with one NVIDIA GPU (H200 here), no network.
#
#   KIMI_GPU_SRC=DIR bash bench/gpu/run.sh [SECONDS]
#
# DIR holds what the machine cannot fetch: llama.cpp.tar.xz (the llama-cpp-python 0.3.36 sdist's
# vendor/llama.cpp, trimmed: bench/gpu/pack.sh makes it) and whl/ (the project's dependencies as wheels for the
# machine's Python). SECONDS (default 560) bounds this call: the sweep stops before a cell that would not fit,
# and a rerun (same machine, same KIMI_GPU_WORK) skips the build, the models and every cell already measured.
# Results: $KIMI_GPU_WORK/results-<shape>-<type>.json, copied with the logs to $OUT when it is set.
set -uo pipefail
T0=$SECONDS
BUDGET=${1:-560}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SRC=$(realpath -m "${KIMI_GPU_SRC:-$ROOT/.gpu}")
WORK=${KIMI_GPU_WORK:-/tmp/kimi-gpu}
TYPE=${KIMI_GPU_TYPE:-q8_0}            # the model type measured; both are written
SHAPE=${KIMI_GPU_SHAPE:-8b}            # mini: the same run on a CPU, in seconds
PY=${KIMI_GPU_PYTHON:-python3}
JOBS=${KIMI_GPU_JOBS:-$(nproc)}
CPUS_LLAMA=${KIMI_GPU_CPUS_LLAMA:-0-11}
CPUS_CLIENT=${KIMI_GPU_CPUS_CLIENT:-12-13}
CPU_GATEWAY=${KIMI_GPU_CPU_GATEWAY:-15}
OUT=${OUT:-$WORK/out}
mkdir -p "$WORK" "$OUT"
cd "$ROOT" || exit 1  # python -m finds this checkout's packages first
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - T0))s] $*" >&2; }
save() {  # the results and one file of log tails ($OUT returns at most 8 files)
  cp -f "$WORK"/results-*.json "$OUT"/ 2>/dev/null
  for f in "$WORK"/*.log "$WORK"/bench/*.log; do [ -f "$f" ] && { echo "=== $f"; tail -c 100000 "$f"; }; done \
    > "$OUT/logs.txt" 2>/dev/null
  true
}
trap save EXIT

# Processes a cut-off earlier call left running (they start their own sessions): only the ones we recorded.
for f in "$WORK"/pids/*; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
mkdir -p "$WORK/pids"

# 1. The project's dependencies for this Python.
if ! "$PY" -c 'import fastapi, pydantic, orjson, gguf, uvicorn, httptools, tenacity' 2>/dev/null \
   && [ ! -f "$WORK/site/.done" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$SRC"/whl/*.whl || exit 1
  touch "$WORK/site/.done"
fi
export PYTHONPATH="$WORK/site:$ROOT"
export PATH="/usr/local/cuda/bin:$PATH"
log "$(nvcc --version 2>&1 | tail -1); $(cmake --version 2>&1 | head -1); ninja $(ninja --version 2>&1); $(df -h "$WORK" | tail -1)"

# 2. llama-server with CUDA for sm_90, from the same source and flags the project builds on the CPU.
BIN=${KIMI_GPU_LLAMA_SERVER:-$WORK/build/bin/llama-server}
if [ ! -x "$BIN" ]; then
  log "building llama-server (CUDA, sm_90, $JOBS jobs)"
  [ -d "$WORK/llama.cpp" ] || tar xJf "$SRC/llama.cpp.tar.xz" -C "$WORK" || exit 1  # kept: ninja resumes
  [ -d "$SRC/llama-scripts" ] && [ ! -d "$WORK/llama.cpp/scripts" ] && cp -r "$SRC/llama-scripts" "$WORK/llama.cpp/scripts"
  FLAGS=$("$PY" -c 'from backends.launchers.llama_build import CMAKE_FLAGS; print(" ".join(CMAKE_FLAGS))') || exit 1
  GEN=""; command -v ninja > /dev/null && GEN="-G Ninja"
  ( cmake -S "$WORK/llama.cpp" -B "$WORK/build" $GEN $FLAGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      && cmake --build "$WORK/build" --target llama-server -j "$JOBS" ) > "$WORK/build.log" 2>&1 &
  BUILD_PID=$!
fi

# 3. The models (meanwhile): an 8B Llama shape in Q8_0 and f16, and two rank-16 adapters.
mkdir -p "$WORK/models"
gen() {  # gen TYPE [--lora A --lora B]
  local model="$WORK/models/llama-$SHAPE-$1.gguf"
  [ -f "$model" ] && return 0
  "$PY" -m gateway.demo.sized_gguf "$model.tmp" --shape "$SHAPE" --type "$@" > "$WORK/gen-$1.log" 2>&1 \
    && mv "$model.tmp" "$model"
}
if [ ! -f "$WORK/models/lora-$SHAPE-b.gguf" ]; then
  "$PY" -m gateway.demo.sized_gguf - --shape "$SHAPE" --lora-only --lora "$WORK/models/lora-$SHAPE-a.gguf" \
    --lora "$WORK/models/lora-$SHAPE-b.gguf" > "$WORK/gen-lora.log" 2>&1 || { log "LoRA generation failed"; cat "$WORK/gen-lora.log"; exit 1; }
fi
gen q8_0 & GEN_Q=$!
if [ "${KIMI_GPU_F16:-1}" = 1 ]; then gen f16 & GEN_F=$!; else GEN_F=; fi
wait $GEN_Q || { log "q8_0 generation failed"; cat "$WORK/gen-q8_0.log"; exit 1; }
[ -z "$GEN_F" ] || wait $GEN_F || { log "f16 generation failed"; cat "$WORK/gen-f16.log"; exit 1; }
log "models: $(cd "$WORK/models" && du -h -- * | tr '\t\n' ' ')"
if [ -n "${BUILD_PID:-}" ]; then
  wait $BUILD_PID || { log "build failed"; tail -40 "$WORK/build.log"; exit 1; }
  log "llama-server built"
fi
"$BIN" --version 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null

# 4. The sweep: llama-server on cores 0-11, the load generator on 12-13, the gateway alone on core 15.
LEFT=$((BUDGET - (SECONDS - T0) - 40))
log "sweep ($SHAPE $TYPE), ${LEFT}s left for it"
PIN=(taskset -c "$CPUS_CLIENT")
if ! command -v taskset > /dev/null; then  # no pinning at all rather than no run; the results say so
  log "no taskset here: nothing is pinned"; PIN=(); CPUS_LLAMA=""; CPU_GATEWAY=""
fi
"${PIN[@]}" "$PY" "$ROOT/bench/gpu/bench.py" --llama-server "$BIN" \
  --model "$WORK/models/llama-$SHAPE-$TYPE.gguf" \
  --lora "$WORK/models/lora-$SHAPE-a.gguf" --lora "$WORK/models/lora-$SHAPE-b.gguf" \
  --out "$WORK/results-$SHAPE-$TYPE.json" --workdir "$WORK/bench" --pid-dir "$WORK/pids" --mirror "$OUT" \
  --llama-cpus "$CPUS_LLAMA" --llama-threads 8 --gateway-cpu "$CPU_GATEWAY" --deadline-s "$LEFT" \
  --py-spy "$(command -v py-spy || echo "$WORK/site/bin/py-spy")" \
  ${KIMI_GPU_BENCH_ARGS:-}
rc=$?
log "bench.py exited with $rc"
exit $rc
