#!/usr/bin/env bash
# Idempotent set-up. `setup.sh quickstart`: Debian's Fashion-MNIST files and a virtual
# environment at .venv with cliplab installed (editable). `setup.sh` (all, what the tests need):
# also the test tools and every extra (ONNX, FAISS/FastAPI, Milvus Lite, Ray, Playwright) and
# Debian's chromium for the browser test. Re-running it reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
case "$mode" in
  quickstart) extras="tensorboard" ;;
  all) extras="dev,tensorboard,onnx,serve,curate,ray,milvus,browser" ;;
  *) echo "usage: scripts/setup.sh [quickstart|all]" >&2; exit 2 ;;
esac

# Debian packages the project needs, each installed only when its file is missing.
apt_install() {  # PACKAGE  FILE-IT-PROVIDES  WHAT-FAILS-WITHOUT-IT
  [ -e "$2" ] && return 0
  echo "setup: installing Debian's $1" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  if command -v apt-get >/dev/null; then
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "$1" >/dev/null \
      || echo "setup: could not install $1; $3" >&2
  else
    echo "setup: no apt-get here; $3" >&2
  fi
}
FMNIST_DIR=/usr/share/datasets/fashion-mnist
[ -f "$FMNIST_DIR/train-images-idx3-ubyte" ] || apt_install dataset-fashion-mnist \
  "$FMNIST_DIR/train-images-idx3-ubyte.gz" "pass --data-dir DIR (the IDX files) to cliplab quickstart"
if [ "$mode" = all ]; then
  # Playwright drives Debian's Chromium in the browser test of `cliplab serve` (no browser download)
  apt_install chromium /usr/bin/chromium "the browser test of cliplab serve will be skipped"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
installed() {  # the stamp of MODE is newer than pyproject.toml
  [ -f ".venv/.cliplab-installed-$1" ] && [ ! pyproject.toml -nt ".venv/.cliplab-installed-$1" ]
}
if ! installed "$mode" && ! installed all; then
  echo "setup: installing cliplab into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # The CPU build of PyTorch first (PyPI's is the CUDA one, several GB); with it installed, the
  # "torch>=2.6" requirement pulls nothing more.
  .venv/bin/python -m pip install -q "torch==2.13.0" --retries 0 --timeout 10 \
      --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
    || .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q "torch>=2.6"
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch ".venv/.cliplab-installed-$mode"
fi
