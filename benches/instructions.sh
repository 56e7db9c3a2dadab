#!/usr/bin/env bash
# Instructions per proxied request, a figure that does not move with CPU contention: each
# binary (or `nginx`) runs under callgrind and serves a fixed number of keep-alive keyed GETs
# (benches/requests.py) to a static nginx origin, and the proxy's instructions (all its
# threads, user space, callgrind's Ir) are divided by the requests answered. A warm-up of
# REQUESTS/4 requests runs first with instrumentation off. CONNECTIONS (default 64, as the
# harness) send at once; with 64, how many requests one wake-up finds moves the figure by
# about 1.5 % between runs, with CONNECTIONS=1 it repeats within 0.1 %.
#   benches/instructions.sh nginx target/base/release/keygate target/release/keygate
#   REQUESTS=20000 benches/instructions.sh target/release/keygate
# KEEP=DIR keeps each callgrind profile there (callgrind_annotate DIR/NAME.out shows it).
# CONFIG picks the keygate config (default benches/keygate-bench.toml: JSON access log on);
# NGINX_ACCESS_LOG=1 gives nginx an access log line per request (to a file).
# Needs nginx, python3 and valgrind. About a minute per binary at 10,000 requests.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUESTS=${REQUESTS:-10000}
dir=$(mktemp -d /tmp/keygate-instr.XXXXXX)
command -v nginx python3 valgrind callgrind_control > /dev/null ||
  { echo "instructions.sh needs nginx, python3 and valgrind on PATH" >&2; exit 1; }
cat > "$dir/origin.conf" <<CONF
worker_processes 1; daemon off; pid $dir/origin.pid; error_log $dir/origin-error.log;
events { worker_connections 1024; }
http { access_log off;
  server { listen 127.0.0.1:18091; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '{"object":"list","data":[{"id":"m","object":"model","created":0,"owned_by":"bench-origin-0123456789"}]}'; } } }
CONF
export API_KEY=kg-instr-key-0123456789abcdef SHARED_SECRET=kg-instr-secret-0123456789
access_log="access_log off;"
if [ "${NGINX_ACCESS_LOG:-0}" = 1 ]; then access_log="access_log $dir/access.log;"; fi
# One process (no master), so callgrind sees the process that does the work.
cat > "$dir/proxy.conf" <<CONF
worker_processes 1; daemon off; master_process off; pid $dir/proxy.pid; error_log $dir/candidate.log;
events { worker_connections 1024; }
http { $access_log
  upstream origin { server 127.0.0.1:18091; keepalive 64; }
  server { listen 127.0.0.1:18113; keepalive_requests 1000000;
    location / {
      if (\$http_authorization != "Bearer $API_KEY") { return 401; }
      proxy_pass http://origin; proxy_http_version 1.1; proxy_buffering off;
      proxy_set_header Connection ""; proxy_set_header Authorization "";
      proxy_set_header X-Shared-Secret "$SHARED_SECRET"; } } }
CONF
nginx -c "$dir/origin.conf" -p "$dir" & origin=$!
trap 'kill $origin ${candidate:-} 2>/dev/null; wait; rm -rf "$dir"' EXIT
wait_port() {
  local deadline=$((SECONDS + 60))
  until (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do
    kill -0 "$2" 2>/dev/null && [ $SECONDS -lt $deadline ] || { echo "port $1 did not open" >&2; exit 1; }
    sleep 0.1
  done
}
wait_port 18091 $origin
start() {
  local grind=(taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out")
  if [ "$1" = nginx ]; then
    "${grind[@]}" nginx -c "$dir/proxy.conf" -p "$dir" > "$dir/candidate.log" 2>&1 &
  else
    "${grind[@]}" "$1" --config "${CONFIG:-benches/keygate-bench.toml}" --listen 127.0.0.1:18113 \
      --upstream http://127.0.0.1:18091 > "$dir/candidate.log" 2>&1 &
  fi
  candidate=$!
  wait_port 18113 $candidate
}
load() { timeout 600 python3 benches/requests.py 18113 "$1" --connections "${CONNECTIONS:-64}"; }
for bin in "$@"; do
  rm -f "$dir"/callgrind.out*
  start "$bin"
  load $((REQUESTS / 4)) > /dev/null
  callgrind_control --instr=on $candidate > /dev/null 2>&1
  load "$REQUESTS" > "$dir/load.out"
  callgrind_control --instr=off $candidate > /dev/null 2>&1
  kill -TERM $candidate; wait $candidate || true
  requests=$(awk '{print $2}' "$dir/load.out")
  instructions=$(cat "$dir"/callgrind.out* | awk '/^(summary|totals):/{s += $2} END {print s}')
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cat "$dir"/callgrind.out* > "$KEEP/$(basename "$bin").out"; fi
  echo "$bin  $(cat "$dir/load.out")" \
    " instructions/request $(awk -v i="$instructions" -v n="$requests" 'BEGIN {printf "%.0f", i / n}')"
done
