#!/usr/bin/env bash
# `make test`: setup (venv, Debian packages, release build), then every test of the workspace.
# Tests build with --release so they share artifacts with the binaries (tch builds once).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
eval "$(scripts/setup.sh --env)"
# Two cores: run test binaries' tests on both, but keep multi-process tests bounded by their own timeouts.
exec cargo test --release --locked --workspace "$@"
