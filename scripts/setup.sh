#!/usr/bin/env bash
# Install AVO and what it needs on a CPU machine or GPU node (idempotent).
#
#   scripts/setup.sh          torch (a CPU build where no CUDA build is installed), avo with its
#                             NVRTC wheels, and the test tools
# On GPU nodes torch with CUDA is usually installed already and is kept as it is.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
py=${PYTHON:-python3}

if ! "$py" -c "import torch" 2>/dev/null; then
  # pinned so pip takes a local CPU wheel where one is provided, never a multi-GB CUDA build
  say "installing torch ${AVO_TORCH_SPEC:-torch==2.13.0} (CPU build)"
  "$py" -m pip install -q ${AVO_TORCH_PIP_ARGS:-} "${AVO_TORCH_SPEC:-torch==2.13.0}"
fi
say "installing avo (editable) with NVRTC wheels and test tools"
"$py" -m pip install -q -e '.[nvrtc,dev]'
"$py" - <<'PY'
from avo.harness.nvrtc import cuda_include_dir
import torch, cuda.core
print(f"[setup] torch {torch.__version__}, cuda.core {cuda.core.__version__}, CUDA headers in {cuda_include_dir()}")
PY
