#!/usr/bin/env bash
# Run recipes/gpu_check.py on a CUDA machine that has torch but not torchtitan and no internet.
# usage: bash recipes/gpu_check.sh [WHEEL_DIR] [DATA_DIR]
#   WHEEL_DIR (default .whl): torchtitan-0.2.2 and the few pure-Python packages it imports that the
#   machine lacks (torchdata, tyro, docstring-parser, typeguard, shtab, datasets, dill, multiprocess),
#   fetched elsewhere with: pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl PKG
#   DATA_DIR (default data/shakespeare): prepared GPT-2-token shards (python data/shakespeare/prepare.py)
set -euo pipefail
whl="${1:-.whl}"
data="${2:-data/shakespeare}"
py="${PYTHON:-python3}"
work="$(mktemp -d)"
"$py" -m pip install -q --no-deps --no-index --target "$work/site" "$whl"/*.whl
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
export NANOLLM_PYTHON="$py"
"$py" -c 'import torch, torchtitan; assert torch.cuda.is_available(), "needs a CUDA GPU"'
"$py" "$(dirname "$0")/gpu_check.py" "$work" "$data"
