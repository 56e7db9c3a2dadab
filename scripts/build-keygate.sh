#!/usr/bin/env bash
# Builds keygate with cargo and prints the path of the binary that cargo reports, so that
# CARGO_TARGET_DIR, --target and .cargo/config settings are honoured. Arguments go to
# `cargo build`, e.g. --release. Used by try-it.sh, tests/interop/run.sh and benches/.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(cargo build --locked --quiet --message-format=json-render-diagnostics "$@" | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == "keygate" \
            and message.get("executable"):
        print(message["executable"])
')
[ -x "$bin" ] || { echo "cargo build did not report a keygate binary" >&2; exit 1; }
echo "$bin"
