#!/usr/bin/env bash
# GPU tests and the default benchmark, on a CUDA machine with torch but without AVO's other
# dependencies: installs the offline wheelhouse (slurm/wheelhouse.sh) into a temporary site
# directory first. Run from the repository root:  scripts/gpu_tests.sh [WHEELHOUSE=.whl] [BENCH_OUT]
set -euo pipefail
WHL=${1:-.whl}
OUT=${2:-outputs/bench/gpu_tests}
SITE=$(mktemp -d /tmp/avo-site.XXXXXX)
trap 'rm -rf "$SITE"' EXIT
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHL"/*.whl
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
echo "== GPU tests"
python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts="" -o timeout=0
echo "== benchmark: naive at the default set"
python3 -m avo.bench kernel=mha seed=naive "out=$OUT"
