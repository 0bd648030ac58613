#!/usr/bin/env bash
# `make demo`: the main job. Today (training lands with the training issue) it sets everything up,
# shows what the machine offers, and resolves the demo spec; see README "What `make demo` does today".
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/setup.sh
bin="${CARGO_TARGET_DIR:-$root/target}/release"
echo "== ddetr doctor"
"$bin/ddetr" doctor
echo "== the demo spec, resolved (configs/shapes_tiny.yaml)"
"$bin/ddetr" spec validate -e configs/shapes_tiny.yaml
echo "demo: training is not part of this version yet; binaries are in $bin"
