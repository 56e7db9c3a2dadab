#!/usr/bin/env bash
# Mutation testing of the security-critical code with cargo-mutants: the credential and the
# key check, the key-less routes, the header rules, scope and preset matching. Each file is
# mutated on its own, one mutant at a time, against only the test suites that exercise it.
# Too slow for .ci/run (about an hour on 2 cores); run it after changing these files, e.g.
#
#   nice -n 10 scripts/mutants.sh                          # every file below
#   nice -n 10 scripts/mutants.sh src/policy/auth.rs       # one file
#   scripts/mutants.sh src/policy/auth.rs -- --re verify   # extra cargo-mutants arguments
#
# Needs `cargo install --locked cargo-mutants` (written against 27.1). Results go to
# mutants/<file> in cargo's target directory (CARGO_TARGET_DIR is honoured): outcomes.json,
# missed.txt, caught.txt, timeout.txt, unviable.txt and a log per mutant. Every mutant it
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
  )
fi

target_dir=$(cargo metadata --locked --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
# Mutants build in a copy of the tree; sharing the target directory reuses the built
# dependencies, so each mutant rebuilds keygate only.
export CARGO_TARGET_DIR="$target_dir"

# The suites that exercise these files: the unit tests beside the code, and the integration
# suites for authentication, key-less routes, header rules, scopes and presets, per-key
# limits and expiry, key reloads, the config summary, the "never" rules and the attacks on
# them. Naming
# the targets in every cargo call keeps the other suites out of each mutant's build.
targets=(
  --lib
  --test=attacks
  --test=auth
  --test=config
  --test=headers
  --test=key_reload
  --test=limits
  --test=never
  --test=routing
  --test=scopes
)
cargo_args=(--locked "${targets[@]}")

status=0
for file in "${files[@]}"; do
  name=$(basename "$file" .rs)
  out="$target_dir/mutants/$name"
  mkdir -p "$out"
  echo "== $file -> $out/mutants.out" >&2
  cargo mutants \
    --file "$file" \
    --jobs 1 \
    --timeout-multiplier 3 \
    --minimum-test-timeout 120 \
    --output "$out" \
    --colors never \
    "${cargo_args[@]/#/--cargo-arg=}" \
    "$@" || status=1
done

echo "== summary: tested caught missed unviable timeout" >&2
for file in "${files[@]}"; do
  name=$(basename "$file" .rs)
  python3 - "$file" "$target_dir/mutants/$name/mutants.out/outcomes.json" <<'EOF' >&2
import json, sys
file, path = sys.argv[1], sys.argv[2]
try:
    o = json.load(open(path))
except OSError:
    print(f"{file}: no outcomes")
    sys.exit()
tested = o["caught"] + o["missed"] + o["unviable"] + o["timeout"]
print(f"{file}: {tested} {o['caught']} {o['missed']} {o['unviable']} {o['timeout']}")
EOF
done
exit $status
