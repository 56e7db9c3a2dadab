#!/usr/bin/env bash
# Runs the Python interop tests (every test_*.py here: the plain and TLS listeners, the examples)
# against the keygate binary.
# KEYGATE_BIN: the binary to test; unset, target/debug/keygate is built with cargo first.
# INTEROP_VENV: where the Python packages are installed (default /tmp/keygate-interop-venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${INTEROP_VENV:-/tmp/keygate-interop-venv}"

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$root/tests/interop/requirements.txt"

cd "$root"
if [ -z "${KEYGATE_BIN:-}" ]; then
  cargo build --locked
fi
exec "$venv/bin/python" -m pytest -q tests/interop "$@"
