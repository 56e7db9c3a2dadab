#!/usr/bin/env bash
# A/B of keygate builds: CPU seconds per 10k requests (split into user and kernel time),
# req/s and peak RSS of each binary, pinned to CPU 0 in turn, with wrk (-t2 -c64, 2 s
# warm-up, 8 s measured) and a static nginx origin on CPU 1. The binaries alternate for
# ROUNDS rounds (default 2), so drift on the VM hits both alike.
#   benches/ab.sh target/base/release/keygate target/release/keygate
# The name `nginx` instead of a binary runs nginx as the proxy (one worker, keep-alive to the
# origin, the same key check and injected header), measured the same way, e.g.
#   benches/ab.sh nginx target/release/keygate
# CONFIG picks the keygate config (default benches/keygate-bench.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/keygate-ab.XXXXXX)
cat > "$dir/origin.conf" <<CONF
worker_processes 1; daemon off; pid $dir/origin.pid; error_log $dir/origin-error.log;
events { worker_connections 1024; }
http { access_log off;
  server { listen 127.0.0.1:18090; keepalive_requests 1000000;
    location / { default_type application/json; return 200 '{"object":"list","data":[{"id":"m","object":"model","created":0,"owned_by":"bench-origin-0123456789"}]}'; } } }
CONF
export API_KEY=kg-ab-key-0123456789abcdef SHARED_SECRET=kg-ab-secret-0123456789
printf 'wrk.headers["Authorization"] = "Bearer %s"\n' "$API_KEY" > "$dir/auth.lua"
command -v nginx wrk > /dev/null || { echo "ab.sh needs nginx and wrk on PATH (Debian: apt-get install nginx wrk)" >&2; exit 1; }
taskset -c 1 nginx -c "$dir/origin.conf" -p "$dir" & origin=$!
trap 'kill $origin ${candidate:-} 2>/dev/null; wait; rm -rf "$dir"' EXIT
until (exec 3<>/dev/tcp/127.0.0.1/18090) 2>/dev/null; do
  kill -0 $origin 2>/dev/null || { echo "the origin nginx did not start" >&2; exit 1; }
  sleep 0.1
done
cat > "$dir/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $dir/proxy.pid; error_log $dir/candidate.log;
events { worker_connections 1024; }
http { access_log off;
  upstream origin { server 127.0.0.1:18090; keepalive 64; }
  server { listen 127.0.0.1:18112; keepalive_requests 1000000;
    location / {
      if (\$http_authorization != "Bearer $API_KEY") { return 401; }
      proxy_pass http://origin; proxy_http_version 1.1; proxy_buffering off;
      proxy_set_header Connection ""; proxy_set_header Authorization "";
      proxy_set_header X-Shared-Secret "$SHARED_SECRET"; } } }
CONF
# Starts the candidate on CPU 0; `measured` is the process whose CPU time counts.
start() {
  if [ "$1" = nginx ]; then
    taskset -c 0 nginx -c "$dir/proxy.conf" -p "$dir" &
  else
    taskset -c 0 "$1" --config "${CONFIG:-benches/keygate-bench.toml}" --listen 127.0.0.1:18112 \
      --upstream http://127.0.0.1:18090 > "$dir/candidate.log" 2>&1 &
  fi
  candidate=$!
  until (exec 3<>/dev/tcp/127.0.0.1/18112) 2>/dev/null; do
    kill -0 $candidate 2>/dev/null || { cat "$dir/candidate.log" >&2; exit 1; }
    sleep 0.05
  done
  measured=$candidate
  if [ "$1" = nginx ]; then measured=$(pgrep -P "$candidate"); fi
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for bin in "$@"; do
    start "$bin"
    taskset -c 1 wrk -t2 -c64 -d2s -s "$dir/auth.lua" http://127.0.0.1:18112/v1/models > /dev/null
    read -r user0 sys0 < <(awk '{print $14, $15}' /proc/$measured/stat)
    out=$(taskset -c 1 wrk -t2 -c64 -d8s -s "$dir/auth.lua" http://127.0.0.1:18112/v1/models)
    read -r user1 sys1 < <(awk '{print $14, $15}' /proc/$measured/stat)
    hwm=$(awk '/VmHWM/{print $2}' /proc/$measured/status)
    kill -TERM $candidate; wait $candidate || true
    requests=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
    ticks=$(getconf CLK_TCK)
    per10k() { awk -v d="$1" -v n="$requests" -v t="$ticks" 'BEGIN {printf "%.3f", d / t * 10000 / n}'; }
    cpu=$(per10k $((user1 + sys1 - user0 - sys0)))
    user=$(per10k $((user1 - user0)))
    sys=$(per10k $((sys1 - sys0)))
    echo "round $round  $bin  req/s $rps  CPU s/10k $cpu (user $user, kernel $sys)  peak RSS ${hwm} KiB"
  done
done
