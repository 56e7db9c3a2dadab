#!/usr/bin/env bash
# Mutation testing of the security-critical code with cargo-mutants: the credential and the
# key check, the key-less routes, the header rules, scope and preset matching, plain paths.
# Each file is mutated on its own, one mutant at a time, in two passes: first against the
# unit tests alone (one test binary to rebuild per mutant, so most mutants are decided in a
# minute or two), then each mutant the unit tests missed again against the integration
# suites that exercise these files as well. Too slow for .ci/run (an hour or more on 2
# cores); run it after changing these files, e.g.
#
#   nice -n 10 scripts/mutants.sh                          # every file below
#   nice -n 10 scripts/mutants.sh src/policy/auth.rs       # one file
#   scripts/mutants.sh src/policy/auth.rs -- --re verify   # extra cargo-mutants arguments
#
# Needs `cargo install --locked cargo-mutants` (written against 27.1). Results go to
# mutants/<file> in cargo's target directory (CARGO_TARGET_DIR is honoured): unit/ for the
# first pass and all/ for the second, each a mutants.out with outcomes.json, missed.txt,
# caught.txt, timeout.txt, unviable.txt and a log per mutant. Every mutant the second pass
# reports missed needs a test that kills it or a paragraph in docs/testing.md saying why it
# is harmless. Exits non-zero when any file has a missed mutant or a timeout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

files=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  files+=("$1")
  shift
done
[ "${1:-}" = "--" ] && shift
if [ ${#files[@]} -eq 0 ]; then
  files=(
    src/policy/auth.rs
    src/policy/route.rs
    src/headers.rs
    src/forward/rewrite.rs
    src/policy/scope.rs
    src/preset.rs
    src/path.rs
    src/gateway/inspect.rs
    src/policy/admission.rs
    src/policy/models/request.rs
  )
fi

target_dir=$(cargo metadata --locked --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# Mutants build in a copy of the tree, into a target directory of their own: built into the
# checkout's, a mutant's artifacts would be newer than the checkout's sources, and cargo
# would take them for up to date there and test the mutant in the next `cargo test`. The
# first run builds the dependencies once; later runs rebuild keygate only.
export CARGO_TARGET_DIR="$target_dir/mutants/target"

# The suites of the second pass: the unit tests beside the code, and the integration suites
# for authentication, key-less routes, header rules, scopes and presets, per-key limits and
# expiry, models, token usage and rates, key reloads, the config summary, the "never" rules
# and the attacks on them. Naming
# the targets in every cargo call keeps the other suites out of each mutant's build.
targets=(
  --lib
  --test=attacks
  --test=auth
  --test=config
  --test=headers
  --test=key_reload
  --test=limits
  --test=models
  --test=never
  --test=rates
  --test=routing
  --test=scopes
  --test=usage
)

# One cargo-mutants run over $file: output directory, then cargo targets, then extra
# cargo-mutants arguments. A run that misses mutants exits non-zero; the summary decides.
mutate() {
  local output="$1" cargo_args=()
  shift
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    cargo_args+=("--cargo-arg=$1")
    shift
  done
  shift
  mkdir -p "$output"
  cargo mutants \
    --file "$file" \
    --jobs 1 \
    --timeout-multiplier 3 \
    --minimum-test-timeout 120 \
    --output "$output" \
    --colors never \
    "${cargo_args[@]}" \
    "$@" || true
}

for file in "${files[@]}"; do
  name=$(basename "$file" .rs)
  out="$target_dir/mutants/$name"
  rm -rf "$out"
  echo "== $file, unit tests -> $out/unit/mutants.out" >&2
  mutate "$out/unit" --locked --lib -- "$@"
  # The first pass's survivors, each by its exact name.
  survivors=()
  missed="$out/unit/mutants.out/missed.txt"
  if [ -s "$missed" ]; then
    mapfile -t survivors < <(python3 -c '
import re, sys
for name in open(sys.argv[1]).read().splitlines():
    if name:
        print("--re=^" + re.escape(name) + "$")
' "$missed")
  fi
  if [ ${#survivors[@]} -gt 0 ]; then
    echo "== $file, ${#survivors[@]} missed, all suites -> $out/all/mutants.out" >&2
    mutate "$out/all" --locked "${targets[@]}" -- "${survivors[@]}" "$@"
  fi
done

# Per file: the first pass's counts, its missed mutants replaced by what the second pass
# made of them.
status=0
echo "== summary: tested caught missed unviable timeout" >&2
for file in "${files[@]}"; do
  name=$(basename "$file" .rs)
  python3 - "$file" "$target_dir/mutants/$name" <<'EOF' >&2 || status=1
import json, sys
from pathlib import Path

file, out = sys.argv[1], Path(sys.argv[2])


def outcomes(part):
    try:
        return json.loads((out / part / "mutants.out" / "outcomes.json").read_text())
    except OSError:
        return None


unit, full = outcomes("unit"), outcomes("all")
if unit is None:
    print(f"{file}: no outcomes")
    sys.exit(1)
counts = {k: unit[k] for k in ("caught", "missed", "unviable", "timeout")}
if counts["missed"]:
    if full is None:
        print(f"{file}: no outcomes from the second pass")
        sys.exit(1)
    counts["missed"] = full["missed"]
    counts["caught"] += full["caught"]
    counts["timeout"] += full["timeout"]
tested = sum(counts.values())
print(f"{file}: {tested} {counts['caught']} {counts['missed']} {counts['unviable']} {counts['timeout']}")
sys.exit(1 if counts["missed"] or counts["timeout"] else 0)
EOF
done
exit $status
