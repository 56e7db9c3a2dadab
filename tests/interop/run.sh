#!/usr/bin/env bash
# Runs the Python interop tests (every test_*.py here: the plain and TLS listeners, the examples)
# against the keygate binary.
# KEYGATE_BIN: the binary to test; unset, keygate is built with cargo and the binary cargo
#   reports is tested (scripts/build-keygate.sh; CARGO_TARGET_DIR is honoured).
# INTEROP_VENV: where the pinned Python packages are installed (default: interop-venv in
#   cargo's target directory, so checkouts and target directories never share one).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

if [ -z "${INTEROP_VENV:-}" ]; then
  target_dir=$(cargo metadata --locked --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
  INTEROP_VENV="$target_dir/interop-venv"
fi
[ -x "$INTEROP_VENV/bin/python" ] || python3 -m venv "$INTEROP_VENV"
"$INTEROP_VENV/bin/python" -m pip install -q --disable-pip-version-check \
  -r tests/interop/requirements.txt

if [ -z "${KEYGATE_BIN:-}" ]; then
  KEYGATE_BIN=$(scripts/build-keygate.sh)
fi
export KEYGATE_BIN
exec "$INTEROP_VENV/bin/python" -m pytest -q tests/interop "$@"
