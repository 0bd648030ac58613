#!/usr/bin/env bash
# `make test`: setup (venv, Debian packages, release build), then every test of the workspace.
# Tests build with --release so they share artifacts with the binaries (tch builds once).
# Ends with one summary line, `tests: N passed, N failed`, added up over every test binary.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
eval "$(scripts/setup.sh --env)"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --locked --workspace --all-targets "$@" 2>&1 | tee "$log" || status=$?
passed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\1/p' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(sed -n 's/^test result: .* \([0-9][0-9]*\) passed; \([0-9][0-9]*\) failed.*/\2/p' "$log" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
if [ "$passed" = 0 ] && [ "$status" = 0 ]; then
  echo "error: no test ran" >&2
  status=1
fi
exit "$status"
