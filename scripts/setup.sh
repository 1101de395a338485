#!/usr/bin/env bash
# Idempotent set-up: Debian's Fashion-MNIST files, and a virtual environment at .venv with cliplab
# installed (editable) plus its test tools. Re-running it reuses what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ] && [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist" >&2
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: could not install dataset-fashion-mnist; pass --data-dir to cliplab quickstart" >&2
  else
    echo "setup: no apt-get here; put the Fashion-MNIST IDX files in a folder and pass --data-dir" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.cliplab-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing cliplab into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # The CPU build first: with it installed, the "torch>=2.4" requirement pulls nothing more.
  .venv/bin/python -m pip install -q "torch==2.13.0" \
    || .venv/bin/python -m pip install -q "torch>=2.4"
  .venv/bin/python -m pip install -q -e ".[dev,onnx]"
  touch "$stamp"
fi
