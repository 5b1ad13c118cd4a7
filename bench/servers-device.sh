#!/usr/bin/env bash
# bench/servers-device.sh: `--workers N` against 1 where there are cores to spare (the `device` machine, 16 cores;
# the 2-vCPU machines here share both cores with the load generator and the upstream). Wheels from
# bench/gpu/pack.sh in $KIMI_DEVICE_SRC (default .gpu). Upstream: two bench/sse_upstream.py (cores 0, 1), the
# gateway's `llamacpp` backend with both as replicas; load: 4 x bench/loadgen.py closed (cores 12-15), 32
# connections each; the gateway's N workers on cores 4..4+N-1. Prints one JSON line per N.
set -u
SRC=${KIMI_DEVICE_SRC:-.gpu}
PY=${KIMI_DEVICE_PYTHON:-python3}
W=${KIMI_DEVICE_WORK:-/tmp/kimi-servers}
DURATION=${KIMI_DEVICE_DURATION:-8}
mkdir -p "$W"
if ! "$PY" -c 'import fastapi, pydantic, orjson, uvicorn, httptools' 2>/dev/null && [ ! -f "$W/site/.done" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" "$SRC"/whl/*.whl \
    && touch "$W/site/.done"
fi
export PYTHONPATH="$W/site:$PWD"
"$PY" -c 'import gateway.app' || exit 1
export KIMI_BENCH_CLIENT_KEY=sk-device-bench
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT
taskset -c 0 "$PY" bench/sse_upstream.py --port 19001 > "$W/up1.log" 2>&1 & pids+=($!)
taskset -c 1 "$PY" bench/sse_upstream.py --port 19002 > "$W/up2.log" 2>&1 & pids+=($!)
cat > "$W/gateway.yaml" <<YAML
listen: {host: 127.0.0.1, port: 18080}
state_dir: $W/state
auth:
  client_keys:
    - {name: bench, key_env: KIMI_BENCH_CLIENT_KEY, models: ["*"], rpm: 100000000, tpm: 10000000000}
backends:
  - {name: up, kind: llamacpp, urls: ["http://127.0.0.1:19001", "http://127.0.0.1:19002"], max_connections: 512}
routes:
  - {name: bench-model, targets: [up]}
YAML
BODY='{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
cpu() { local t=0; for p in $(pgrep -g "$1"); do set -- $(cut -d')' -f2 /proc/$p/stat); t=$((t + ${12} + ${13})); done; echo $t; }
sleep 1
for N in ${KIMI_DEVICE_WORKERS:-1 2 4 1 2 4}; do
  last=$((3 + N))
  setsid taskset -c 4-$last "$PY" -m gateway.cli serve --config "$W/gateway.yaml" --workers $N > "$W/gw$N.log" 2>&1 &
  gw=$!
  for _ in $(seq 120); do curl -sf http://127.0.0.1:18080/readyz > /dev/null && break; sleep 0.5; done
  sleep $((N > 1 ? 6 : 1))
  before=$(cpu $gw)
  outs=()
  for c in 12 13 14 15; do
    taskset -c $c "$PY" bench/loadgen.py closed --url http://127.0.0.1:18080/v1/chat/completions --body "$BODY" \
      --header "Authorization: Bearer $KIMI_BENCH_CLIENT_KEY" --connections 32 --requests 10000000 \
      --max-seconds $DURATION > "$W/load$c.json" 2>&1 &
    outs+=($!)
  done
  wait "${outs[@]}"
  after=$(cpu $gw)
  "$PY" - "$N" "$before" "$after" "$W" <<'PYEOF'
import json, os, sys
n, before, after, w = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
runs = [json.loads([l for l in open(f"{w}/load{c}.json") if l.startswith("{")][-1]) for c in (12, 13, 14, 15)]
ok = sum(r["ok"] for r in runs)
seconds = max(r["seconds"] for r in runs)
cpu_s = (after - before) / os.sysconf("SC_CLK_TCK")
print(json.dumps({"workers": n, "rps": round(ok / seconds), "ok": ok, "errors": sum(r["errors"] for r in runs),
                  "cpu_us_per_request": round(cpu_s * 1e6 / ok, 1) if ok else None, "seconds": seconds}), flush=True)
PYEOF
  kill -TERM -- -$gw 2>/dev/null; kill -TERM -- -$gw 2>/dev/null; wait $gw 2>/dev/null
done
