#!/usr/bin/env bash
# The fairness benchmark: a slot-limited origin (slot_origin.py: SLOTS generations at once,
# FIFO beyond them, TOKEN_MS per token) under a batch key keeping BATCH_STREAMS streams in
# flight and an interactive key sending short requests one after another (drive.py). Reports
# the interactive key's p50/p99 latency and each key's tokens/s, once per setup.
#   benches/fairness/run.sh                                  # the three setups below
#   benches/fairness/run.sh direct benches/fairness/keygate.toml
# Each argument is a setup: `direct` (the load goes straight to the origin) or a keygate
# config file (keygate runs it with --listen and --upstream on the command line, and the keys
# batch and interactive from BATCH_KEY and INTERACTIVE_KEY). The default setups are direct,
# benches/fairness/keygate.toml (no max_in_flight) and benches/fairness/keygate-fair.toml
# (max_in_flight = 4, the default SLOTS); a keygate without fair admission refuses the last
# one's max_in_flight as an unknown key, and the setup is reported as not started.
# Environment: SLOTS (4), TOKEN_MS (20), BATCH_STREAMS (40), BATCH_TOKENS (32),
# INTERACTIVE_TOKENS (8), WARMUP (5 s), DURATION (30 s), ORIGIN_PORT (18300), KEYGATE_PORT
# (18301), KEYGATE_BIN (default: a release build by scripts/build-keygate.sh). Needs python3.
# ORIGIN=llama runs llama.cpp's own llama-server instead of slot_origin.py, with --parallel
# SLOTS and the interop suite's tiny model (written by tests/interop/llama/make_model.py with
# MODEL_PYTHON, which needs the `gguf` package of tests/interop/llama/requirements.txt);
# LLAMA_SERVER names its binary (default: the one tests/interop/llama/build.sh caches).
# It generates as fast as its CPU allows, so TOKEN_MS does not apply there.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -gt 0 ] || set -- direct benches/fairness/keygate.toml benches/fairness/keygate-fair.toml
SLOTS=${SLOTS:-4} TOKEN_MS=${TOKEN_MS:-20} DURATION=${DURATION:-30} WARMUP=${WARMUP:-5}
ORIGIN_PORT=${ORIGIN_PORT:-18300} KEYGATE_PORT=${KEYGATE_PORT:-18301}
export BATCH_KEY=kg-fair-batch-0123456789abcdef INTERACTIVE_KEY=kg-fair-interactive-0123456789
for setup in "$@"; do
  if [ "$setup" != direct ] && [ -z "${KEYGATE_BIN:-}" ]; then
    KEYGATE_BIN=$(scripts/build-keygate.sh --release)
  fi
done
dir=$(mktemp -d /tmp/keygate-fairness.XXXXXX)
ORIGIN=${ORIGIN:-slots}
if [ "$ORIGIN" = llama ]; then
  LLAMA_SERVER=${LLAMA_SERVER:-$(tests/interop/llama/build.sh)}
  "${MODEL_PYTHON:-python3}" tests/interop/llama/make_model.py "$dir/tiny-llama.gguf" >&2
fi
origin='' keygate=''
stop() {
  for pid in $keygate $origin; do kill "$pid" 2>/dev/null || true; done
  for pid in $keygate $origin; do wait "$pid" 2>/dev/null || true; done
  keygate='' origin=''
}
trap 'stop; rm -rf "$dir"' EXIT

# Waits until something accepts on 127.0.0.1:$1, while process $2 lives, for at most 10 s.
wait_port() {
  local deadline=$((SECONDS + 10))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    kill -0 "$2" 2>/dev/null && [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

echo "ORIGIN=$ORIGIN SLOTS=$SLOTS TOKEN_MS=$TOKEN_MS BATCH_STREAMS=${BATCH_STREAMS:-40} BATCH_TOKENS=${BATCH_TOKENS:-32}" \
  "INTERACTIVE_TOKENS=${INTERACTIVE_TOKENS:-8} WARMUP=$WARMUP DURATION=$DURATION" >&2
for setup in "$@"; do
  # A fresh origin per setup, so no queue is left over from the one before.
  if [ "$ORIGIN" = llama ]; then
    "$LLAMA_SERVER" --model "$dir/tiny-llama.gguf" --host 127.0.0.1 --port "$ORIGIN_PORT" \
      --parallel "$SLOTS" --ctx-size $((SLOTS * 2048)) --threads 1 --threads-batch 1 \
      --no-webui > "$dir/llama-server.log" 2>&1 & origin=$!
    # It listens before the model is loaded and answers 503 until then.
    deadline=$((SECONDS + 60))
    until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$ORIGIN_PORT/health', timeout=2)" 2>/dev/null; do
      kill -0 "$origin" 2>/dev/null && [ $SECONDS -lt $deadline ] || { echo "llama-server did not start" >&2; exit 1; }
      sleep 0.2
    done
  else
    python3 benches/fairness/slot_origin.py --port "$ORIGIN_PORT" --slots "$SLOTS" \
      --token-ms "$TOKEN_MS" & origin=$!
  fi
  wait_port "$ORIGIN_PORT" "$origin" || { echo "the origin did not start" >&2; exit 1; }
  url="http://127.0.0.1:$ORIGIN_PORT"
  if [ "$setup" != direct ]; then
    log="$dir/keygate-$(basename "$setup").log"
    "$KEYGATE_BIN" --config "$setup" --listen "127.0.0.1:$KEYGATE_PORT" \
      --upstream "http://127.0.0.1:$ORIGIN_PORT" > "$log" 2>&1 & keygate=$!
    if ! wait_port "$KEYGATE_PORT" "$keygate"; then
      echo "$setup: keygate did not start:" >&2
      tail -5 "$log" >&2
      stop
      continue
    fi
    url="http://127.0.0.1:$KEYGATE_PORT"
  fi
  python3 benches/fairness/drive.py --url "$url" --setup "$setup" \
    --batch-key "$BATCH_KEY" --interactive-key "$INTERACTIVE_KEY" \
    --batch-streams "${BATCH_STREAMS:-40}" --batch-tokens "${BATCH_TOKENS:-32}" \
    --interactive-tokens "${INTERACTIVE_TOKENS:-8}" --warmup "$WARMUP" --duration "$DURATION"
  stop
done
