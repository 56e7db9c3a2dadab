#!/usr/bin/env bash
# TLS termination side by side: nginx and keygate (release build) each terminate TLS on CPU 0
# in front of the same static nginx origin on CPU 1, with the load generator on CPU 1.
# Three loads per proxy: HTTP/1.1 keep-alive (wrk -c64), HTTP/2 (h2load, 16 connections x 8
# streams) and one new TLS connection per request (h2load --h1 with Connection: close).
# Needs nginx, wrk, h2load and openssl on PATH (Debian: apt-get install nginx wrk nghttp2-client openssl).
#   benches/tls-bench.sh [seconds per load, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
keygate=$(scripts/build-keygate.sh --release)
dir=$(mktemp -d /tmp/keygate-tls-bench.XXXXXX)
key=kg-tls-bench-key-0123456789abcdef
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost 2>/dev/null
cat > "$dir/origin.conf" <<CONF
worker_processes 1; daemon off; pid $dir/origin.pid; error_log $dir/origin-error.log;
events { worker_connections 4096; }
http { access_log off;
  server { listen 127.0.0.1:18200; keepalive_requests 1000000; location / { return 200 '{"ok":true}'; } } }
CONF
cat > "$dir/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $dir/proxy.pid; error_log $dir/proxy-error.log;
events { worker_connections 4096; }
http { access_log off;
  upstream origin { server 127.0.0.1:18200; keepalive 64; }
  server { listen 127.0.0.1:18443 ssl http2;
    ssl_certificate $dir/cert.pem; ssl_certificate_key $dir/key.pem; ssl_protocols TLSv1.2 TLSv1.3;
    keepalive_requests 1000000;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } } }
CONF
cat > "$dir/keygate.toml" <<CONF
[server]
listen = "127.0.0.1:18444"
tls_cert = "$dir/cert.pem"
tls_key = "$dir/key.pem"
workers = 1
[upstream]
url = "http://127.0.0.1:18200"
[auth]
keys = [{ name = "bench", env = "API_KEY" }]
[log]
level = "error"
CONF
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait; rm -rf "$dir"' EXIT
taskset -c 1 nginx -c "$dir/origin.conf" -p "$dir" & pids+=($!)
taskset -c 0 nginx -c "$dir/proxy.conf" -p "$dir" & pids+=($!)
API_KEY=$key taskset -c 0 "$keygate" --config "$dir/keygate.toml" & pids+=($!)
for port in 18200 18443 18444; do
  until (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; do sleep 0.1; done
done
auth="Authorization: Bearer $key"
for proxy in "nginx 18443" "keygate 18444"; do
  set -- $proxy
  url="https://localhost:$2/v1/models"
  h1=$(taskset -c 1 wrk -t1 -c64 -d"${secs}s" --latency -H "$auth" "$url")
  h2=$(taskset -c 1 h2load -c16 -m8 -D"$secs" -H "$auth" "$url" 2>/dev/null)
  fresh=$(taskset -c 1 h2load --h1 -c8 -n4000 -H "$auth" -H "Connection: close" "$url" 2>/dev/null)
  printf '%-8s h1 %9s req/s (p99 %s)   h2 %9s req/s   new TLS connection per request %7s req/s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$h1")" "$(awk '/ 99%/ {print $2}' <<<"$h1")" \
    "$(awk '/finished in/ {print $4}' <<<"$h2")" "$(awk '/finished in/ {print $4}' <<<"$fresh")"
done
