#!/usr/bin/env bash
# Runs keygate on its default config (config/keygate.toml) in front of a local demo origin,
# both on 127.0.0.1, and prints requests to try. Ctrl-C stops both.
#   API_KEY / SHARED_SECRET: taken from the environment, or generated.
#   KEYGATE_PORT (8080), ORIGIN_PORT (8000).
# The binary is the one cargo reports (scripts/build-keygate.sh), so CARGO_TARGET_DIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
KEYGATE=$(scripts/build-keygate.sh)
# Plain assignments, so that a failing keygen stops the script (export would hide its status).
API_KEY=${API_KEY:-$("$KEYGATE" keygen)}
SHARED_SECRET=${SHARED_SECRET:-$("$KEYGATE" keygen)}
export API_KEY SHARED_SECRET
KEYGATE_PORT=${KEYGATE_PORT:-8080}
ORIGIN_PORT=${ORIGIN_PORT:-8000}

python3 scripts/demo_origin.py "$ORIGIN_PORT" &
origin=$!
trap 'kill $origin 2>/dev/null' EXIT
for _ in $(seq 1 50); do
  curl -fs "http://127.0.0.1:$ORIGIN_PORT/health" >/dev/null && break
  kill -0 $origin 2>/dev/null || { echo "demo origin failed to start" >&2; exit 1; }
  sleep 0.1
done

cat <<TRY
keygate on http://127.0.0.1:$KEYGATE_PORT -> demo origin on 127.0.0.1:$ORIGIN_PORT
  export API_KEY=$API_KEY
  curl -i http://127.0.0.1:$KEYGATE_PORT/health
  curl -i http://127.0.0.1:$KEYGATE_PORT/v1/models                                   # 401
  curl -i http://127.0.0.1:$KEYGATE_PORT/v1/models -H "Authorization: Bearer \$API_KEY"
  curl -N http://127.0.0.1:$KEYGATE_PORT/v1/chat/completions -H "Authorization: Bearer \$API_KEY" \\
       -d '{"model":"demo","stream":true,"messages":[]}'
TRY
"$KEYGATE" --config config/keygate.toml --listen "127.0.0.1:$KEYGATE_PORT" \
  --upstream "http://127.0.0.1:$ORIGIN_PORT" --log-format text &
keygate=$!
# Ctrl-C or a SIGTERM to this script stops both (keygate drains, then exits).
trap 'kill $keygate $origin 2>/dev/null; wait' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
wait $keygate
