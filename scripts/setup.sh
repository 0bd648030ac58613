#!/usr/bin/env bash
# One-command setup for ddetr on a fresh Debian machine (root, package registries only).
#
#   scripts/setup.sh            install what is missing, then build the release binaries
#   scripts/setup.sh --env      print the environment (shell `export` lines) and do nothing else
#
# What it does, each step skipped when already done (a second run takes seconds):
#   1. Debian packages bindgen and the C++ build need (libclang-dev, g++, pkg-config).
#   2. A Python virtualenv holding torch==2.11.0 (+ its nvidia-nccl-cu13), kept in a cache outside
#      the clone ($DDETR_CACHE, default ~/.cache/ddetr) and reused while its torch version matches.
#      Also onnx and onnxruntime (the ONNX export tests run the exported models with them).
#   3. `cargo build --release` of `ddetr` (the front), `ddetr-torch` (the full CLI it execs) and
#      `ddetr-launch`; the binaries carry an rpath to the venv's torch/lib, so they run without
#      LD_LIBRARY_PATH.
# Knobs: DDETR_CACHE, DDETR_VENV (an existing venv to use), CARGO_TARGET_DIR, DDETR_SKIP_BUILD=1.
set -euo pipefail

TORCH_VERSION=2.11.0
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${DDETR_CACHE:-$HOME/.cache/ddetr}"
venv="${DDETR_VENV:-$cache/venv-torch-$TORCH_VERSION}"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

site_packages() { echo "$venv/lib/python$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages"; }

print_env() {
  local sp; sp="$(site_packages)"
  echo "export VIRTUAL_ENV='$venv'"
  echo "export PATH='$venv/bin':\"\$PATH\""
  echo "export LIBTORCH_USE_PYTORCH=1"
  echo "export DDETR_TORCH_LIB='$sp/torch/lib'"
  echo "export DDETR_NCCL_LIB='$sp/nvidia/nccl/lib/libnccl.so.2'"
  echo "export DDETR_NCCL_INCLUDE='$sp/nvidia/nccl/include'"
}

venv_ok() {
  [ -x "$venv/bin/python" ] && [ -d "$venv/lib" ] || return 1
  local sp; sp="$(site_packages 2>/dev/null)" || return 1
  compgen -G "$sp/torch-$TORCH_VERSION.dist-info" >/dev/null || return 1
  [ -f "$sp/nvidia/nccl/include/nccl.h" ] && [ -f "$sp/nvidia/nccl/lib/libnccl.so.2" ]
}

if [ "${1:-}" = "--env" ]; then
  venv_ok || die "no ddetr virtualenv at $venv: run scripts/setup.sh first"
  print_env
  exit 0
fi

# --- 0. the tools we cannot install ourselves --------------------------------------------------
command -v python3 >/dev/null || die "python3 not found: install Python 3.9+ (apt-get install python3 python3-venv) and rerun"
command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (https://rustup.rs) and rerun"

# --- 1. Debian packages --------------------------------------------------------------------------
have_libclang() { dpkg -s libclang-dev >/dev/null 2>&1 || compgen -G "/usr/lib/llvm-*/lib/libclang.so" >/dev/null; }
missing=()
have_libclang || missing+=(libclang-dev)
command -v g++ >/dev/null || missing+=(g++)
command -v pkg-config >/dev/null || missing+=(pkg-config)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    die "missing Debian packages: ${missing[*]}: run 'sudo apt-get install -y ${missing[*]}' and rerun"
  fi
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed: see the output above"
fi

# --- 2. the torch virtualenv ---------------------------------------------------------------------
if venv_ok; then
  say "reusing $venv (torch $TORCH_VERSION)"
else
  mkdir -p "$(dirname "$venv")"
  free_kib=$(df -Pk "$(dirname "$venv")" | awk 'NR==2 {print $4}')
  if [ "${free_kib:-0}" -lt $((8 * 1024 * 1024)) ]; then
    die "only $((free_kib / 1024)) MiB free under $(dirname "$venv"): torch $TORCH_VERSION needs about 8 GiB; free some space or set DDETR_CACHE to a larger disk"
  fi
  say "creating $venv with torch==$TORCH_VERSION (about 4.5 GiB, a few minutes)"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed: install python3-venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" \
    || die "pip install torch==$TORCH_VERSION failed (network to PyPI? disk space?)"
  sp="$(site_packages)"
  if [ ! -f "$sp/nvidia/nccl/include/nccl.h" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check nvidia-nccl-cu13 \
      || die "pip install nvidia-nccl-cu13 failed"
  fi
  venv_ok || die "the virtualenv at $venv is incomplete after install: remove it and rerun"
fi

# onnx + onnxruntime: the export tests check the ONNX files with them (trainer/tests/onnx_export.rs),
# and `ddetr quantize` opens the wheel's libonnxruntime.so at run time (the ort crate's C API 22:
# onnxruntime 1.22 or newer).
if "$venv/bin/python" -c 'import onnx, numpy, onnxruntime as o; assert tuple(map(int, o.__version__.split(".")[:2])) >= (1, 22)' 2>/dev/null; then
  say "onnx and onnxruntime present"
else
  say "installing onnx and onnxruntime into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check onnx "onnxruntime>=1.22" numpy \
    || die "pip install onnx onnxruntime failed (network to PyPI?)"
fi

# --- 3. the release binaries ---------------------------------------------------------------------
if [ "${DDETR_SKIP_BUILD:-0}" != 1 ]; then
  eval "$(print_env)"
  say "building release binaries (first build about 3 minutes)"
  (cd "$root" && cargo build --release --locked --bins -q) || die "cargo build failed: see the errors above"
  bin_dir="${CARGO_TARGET_DIR:-$root/target}/release"
  "$bin_dir/ddetr" --version >/dev/null || die "$bin_dir/ddetr does not run: rpath to $DDETR_TORCH_LIB missing?"
  say "ready: $bin_dir/ddetr (execs $bin_dir/ddetr-torch), $bin_dir/ddetr-launch"
fi
