#!/usr/bin/env bash
# The cost of reading request bodies for their model and responses for their token usage:
# CPU seconds per 10k requests (user and kernel) and peak RSS of one keygate binary, pinned to
# CPU 0, for the same POSTs sent so that keygate inspects them or not. wrk (-t2 -c64, 2 s
# warm-up, 8 s measured) and a static nginx origin share CPU 1. Variants alternate for ROUNDS
# rounds (default 2).
#   benches/inspect-ab.sh target/release/keygate
# Variants, each POSTing to a key with access log on:
#   chat/pass     2 KB chat body sent as multipart/form-data: the body forwarded unread (the
#                 baseline; its answer is read for usage, as every keyed answer is)
#   chat/usage    the same body as JSON, a key without models: read ahead, usage read
#   chat/models   the same, a key with models: the model decided as well
#   stream/pass   a streamed chat (22 events) sent as multipart: the body unread, the events
#                 counted and passed on
#   stream/strip  the same as JSON without include_usage: asked for, the usage event removed
#   1mb/pass      a 1 MiB body as multipart (peak RSS: the streaming path)
#   1mb/models    a 1 MiB JSON body naming its model last, a key with models
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$1
command -v nginx wrk > /dev/null || { echo "inspect-ab.sh needs nginx and wrk on PATH" >&2; exit 1; }
dir=$(mktemp -d /tmp/keygate-inspect.XXXXXX)
usage='"usage":{"prompt_tokens":421,"total_tokens":439,"completion_tokens":18}'
json="{\"id\":\"chatcmpl-9c1f\",\"object\":\"chat.completion\",\"created\":1732000000,\"model\":\"Qwen/Qwen3-0.6B\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Keygate checks each key in constant time.\"},\"finish_reason\":\"stop\"}],$usage}"
event() { printf 'data: {"id":"chatcmpl-9c1f","object":"chat.completion.chunk","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":" tok%s"},"finish_reason":null}]}\n\n' "$1"; }
{
  for i in $(seq 1 20); do event "$i"; done
  printf 'data: {"id":"chatcmpl-9c1f","object":"chat.completion.chunk","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[],%s}\n\n' "$usage"
  printf 'data: [DONE]\n\n'
} > "$dir/stream.txt"
printf '%s' "$json" > "$dir/chat.json"
chmod -R a+rX "$dir"  # nginx workers run as another user
cat > "$dir/origin.conf" <<CONF
worker_processes 1; daemon off; pid $dir/origin.pid; error_log $dir/origin-error.log;
events { worker_connections 1024; }
http { access_log off; client_max_body_size 4m; client_body_buffer_size 2m;
  server { listen 127.0.0.1:18091; keepalive_requests 1000000;
    location /v1/chat/completions { default_type application/json; alias $dir/chat.json; error_page 405 =200 \$uri; }
    location /v1/completions { default_type text/event-stream; alias $dir/stream.txt; error_page 405 =200 \$uri; } } }
CONF
export API_KEY=kg-inspect-key-0123456789ab MODELS_KEY=kg-inspect-models-0123456789
cat > "$dir/keygate.toml" <<CONF
[server]
max_request_body = "4MiB"
[auth]
keys = [{ name = "plain", env = "API_KEY" }, { name = "limited", env = "MODELS_KEY", models = ["Qwen/Qwen3-0.6B"] }]
[log]
format = "json"
level = "info"
CONF
turn='{"role": "user", "content": "Summarise the following paragraph in one sentence, keeping every figure: keygate authenticates each request with a constant-time key check, forwards it over a pooled connection and streams both bodies in constant memory."}'
turns=$(printf '%s, ' "$turn" "$turn" "$turn" "$turn" "$turn" "$turn" "$turn")
chat="{\"messages\": [${turns%, }], \"model\": \"Qwen/Qwen3-0.6B\", \"max_tokens\": 256}"
streamed="{\"messages\": [${turns%, }], \"model\": \"Qwen/Qwen3-0.6B\", \"max_tokens\": 256, \"stream\": true}"
big="{\"messages\": [{\"role\": \"user\", \"content\": \"$(head -c 1048576 /dev/zero | tr '\0' 'x')\"}], \"model\": \"Qwen/Qwen3-0.6B\"}"
# lua PATH KEY CONTENT_TYPE BODY_FILE: a wrk script POSTing the file's bytes.
lua() {
  cat > "$dir/$5.lua" <<LUA
local f = io.open("$dir/$4", "rb"); local body = f:read("*a"); f:close()
wrk.method = "POST"; wrk.path = "$1"; wrk.body = body
wrk.headers["Authorization"] = "Bearer $2"; wrk.headers["Content-Type"] = "$3"
LUA
}
printf '%s' "$chat" > "$dir/chat-body"
printf '%s' "$streamed" > "$dir/stream-body"
printf '%s' "$big" > "$dir/big-body"
form="multipart/form-data; boundary=x"
lua /v1/chat/completions "$API_KEY" "$form" chat-body chat_pass
lua /v1/chat/completions "$API_KEY" application/json chat-body chat_usage
lua /v1/chat/completions "$MODELS_KEY" application/json chat-body chat_models
lua /v1/completions "$API_KEY" "$form" stream-body stream_pass
lua /v1/completions "$API_KEY" application/json stream-body stream_strip
lua /v1/chat/completions "$API_KEY" "$form" big-body 1mb_pass
lua /v1/chat/completions "$MODELS_KEY" application/json big-body 1mb_models
taskset -c 1 nginx -c "$dir/origin.conf" -p "$dir" & origin=$!
trap 'kill $origin ${candidate:-} 2>/dev/null; wait; rm -rf "$dir"' EXIT
until (exec 3<>/dev/tcp/127.0.0.1/18091) 2>/dev/null; do
  kill -0 $origin 2>/dev/null || { cat "$dir/origin-error.log" >&2; exit 1; }
  sleep 0.1
done
ticks=$(getconf CLK_TCK)
for round in $(seq 1 "${ROUNDS:-2}"); do
  for variant in chat_pass chat_usage chat_models stream_pass stream_strip 1mb_pass 1mb_models; do
    taskset -c 0 "$bin" --config "$dir/keygate.toml" --listen 127.0.0.1:18113 \
      --upstream http://127.0.0.1:18091 > "$dir/keygate.log" 2>&1 &
    candidate=$!
    until (exec 3<>/dev/tcp/127.0.0.1/18113) 2>/dev/null; do
      kill -0 $candidate 2>/dev/null || { cat "$dir/keygate.log" >&2; exit 1; }
      sleep 0.05
    done
    script="$dir/$variant.lua"
    taskset -c 1 wrk -t2 -c64 -d2s -s "$script" http://127.0.0.1:18113 > /dev/null
    read -r user0 sys0 < <(awk '{print $14, $15}' /proc/$candidate/stat)
    out=$(taskset -c 1 wrk -t2 -c64 -d8s -s "$script" http://127.0.0.1:18113)
    read -r user1 sys1 < <(awk '{print $14, $15}' /proc/$candidate/stat)
    hwm=$(awk '/VmHWM/{print $2}' /proc/$candidate/status)
    kill -TERM $candidate; wait $candidate || true
    # 499: wrk closes its connections with requests in flight when its time is up.
    errors='"status":(4([0-8][0-9]|9[0-8])|5[0-9][0-9])'
    if grep -Eq "$errors" "$dir/keygate.log"; then
      echo "$variant: keygate answered an error:" >&2
      grep -E -m3 "$errors" "$dir/keygate.log" >&2
      exit 1
    fi
    requests=$(awk '/requests in/{print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/{print $2}' <<<"$out")
    per10k() { awk -v d="$1" -v n="$requests" -v t="$ticks" 'BEGIN {printf "%.3f", d / t * 10000 / n}'; }
    echo "round $round  ${variant/_//}  req/s $rps  CPU s/10k $(per10k $((user1 + sys1 - user0 - sys0))) (user $(per10k $((user1 - user0))), kernel $(per10k $((sys1 - sys0))))  peak RSS ${hwm} KiB"
  done
done
