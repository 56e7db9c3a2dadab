#!/usr/bin/env bash
# End-to-end comparison: keygate (release build) as the candidate of a side-by-side benchmark
# harness that runs direct, nginx, haproxy and caddy too, keygate pinned to one core. The
# harness is not part of this repository: BENCH_DIR names its directory, whose run.sh starts
# the candidate as  API_KEY=... SHARED_SECRET=... UPSTREAM=URL LISTEN=ADDR bash -c 'CMD'
# (--proxy-cmd CMD --proxy-port P --proxy-name NAME). Extra arguments go to run.sh, e.g.
#   BENCH_DIR=/path/to/bench benches/run-bench.sh --repeat 1 --only direct,nginx,keygate
# KEYGATE_BENCH_CONFIG picks another keygate config (default benches/keygate-bench.toml), e.g.
# benches/keygate-bench-policy.toml with a preset, key limits and SSE keep-alive.
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${BENCH_DIR:?set BENCH_DIR to the benchmark harness directory (the one holding run.sh)}
keygate=$(scripts/build-keygate.sh --release)
exec "$BENCH/run.sh" \
  --proxy-cmd "\"$keygate\" --config ${KEYGATE_BENCH_CONFIG:-benches/keygate-bench.toml} --listen \"\$LISTEN\" --upstream \"\$UPSTREAM\"" \
  --proxy-port 18110 --proxy-name keygate "$@"
