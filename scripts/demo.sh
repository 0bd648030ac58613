#!/usr/bin/env bash
# `make demo`: the main job, end to end on this machine's CPU cores:
#   1. setup (idempotent: toolchain, libtorch venv, release build),
#   2. `ddetr dataset synth`: the shapes train and val sets at 128x128 (data/shapes/),
#   3. `ddetr-launch --nodes 1 --nproc-per-node 2 -- train -e configs/shapes_tiny.yaml`
#      (two DDP ranks over the shared-memory CPU collectives; results/shapes_tiny/train/),
#   4. `ddetr evaluate` of the last checkpoint on the val set (results/shapes_tiny/evaluate/).
# Env: DEMO_TRAIN_IMAGES / DEMO_VAL_IMAGES (defaults 1600 / 100), DEMO_NPROC (2), DDETR_BIN_DIR
# (use already-built binaries instead of building; skips setup).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ -n "${DDETR_BIN_DIR:-}" ]; then
  bin="$DDETR_BIN_DIR"
else
  scripts/setup.sh
  bin="${CARGO_TARGET_DIR:-$root/target}/release"
fi
train_n="${DEMO_TRAIN_IMAGES:-1600}"
val_n="${DEMO_VAL_IMAGES:-100}"
nproc="${DEMO_NPROC:-2}"
spec=configs/shapes_tiny.yaml
t0=$(date +%s)
# Objects of 16 px and more a side (the peer's S/8 at 128x128; COCO small and medium).
synth_flags=(--size 128x128 --min-side 16)
echo "== synthetic shapes: $train_n train / $val_n val images, ${synth_flags[*]} (data/shapes/)"
synth() { # split images seed: (re)generate unless the same arguments made it already
  local dir="data/shapes/$1" args="--images $2 --seed $3 ${synth_flags[*]}"
  [ -f "$dir/annotations.json" ] && [ "$(cat "$dir/.synth-args" 2>/dev/null)" = "$args" ] && return
  rm -rf "$dir"
  "$bin/ddetr" dataset synth --out "$dir" --images "$2" --seed "$3" "${synth_flags[@]}"
  echo "$args" >"$dir/.synth-args"
}
synth train "$train_n" 1
synth val "$val_n" 2
echo "== train: $nproc ranks, $spec"
"$bin/ddetr-launch" --nodes 1 --nproc-per-node "$nproc" -- train -e "$spec"
echo "== evaluate: the last checkpoint on the val set"
"$bin/ddetr" evaluate -e "$spec" evaluate.checkpoint=results/shapes_tiny/train/dd_model_latest.safetensors
infer_n="${DEMO_INFER_IMAGES:-8}"
echo "== inference: the last checkpoint on $infer_n val images (data/shapes/infer/)"
rm -rf data/shapes/infer && mkdir -p data/shapes/infer
val_files=(data/shapes/val/images/*)
cp "${val_files[@]:0:$infer_n}" data/shapes/infer/
"$bin/ddetr" inference -e "$spec" inference.checkpoint=results/shapes_tiny/train/dd_model_latest.safetensors \
  "dataset.infer_data_sources={image_dir: [data/shapes/infer], classmap: data/shapes/val/label_map.txt}"
t1=$(date +%s)
echo "demo: done in $(( (t1 - t0) / 60 )) min $(( (t1 - t0) % 60 )) s"
echo "demo: training results (checkpoints, status.json, experiment.yaml, loss.png, map.png) in $root/results/shapes_tiny/train"
echo "demo: evaluation (metrics.json, results.json) in $root/results/shapes_tiny/evaluate"
echo "demo: inference (images_annotated/, labels/ in KITTI format) in $root/results/shapes_tiny/inference"
