#!/usr/bin/env bash
# End-to-end comparison: keygate (release build) beside direct, nginx, haproxy and caddy in
# ../shared/bench/run.sh, keygate pinned to one core. Extra arguments go to run.sh, e.g.
#   benches/run-bench.sh --repeat 1 --only direct,nginx,keygate
# KEYGATE_BENCH_CONFIG picks another keygate config (default benches/keygate-bench.toml), e.g.
# benches/keygate-bench-policy.toml with a preset, key limits and SSE keep-alive.
# Needs ../shared/bench/setup.sh once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH_DIR:-../shared/bench}
cargo build --release --locked --quiet
exec "$BENCH/run.sh" \
  --proxy-cmd "./target/release/keygate --config ${KEYGATE_BENCH_CONFIG:-benches/keygate-bench.toml} --listen \"\$LISTEN\" --upstream \"\$UPSTREAM\"" \
  --proxy-port 18110 --proxy-name keygate "$@"
