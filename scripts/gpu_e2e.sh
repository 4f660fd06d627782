#!/usr/bin/env bash
# End to end on a GPU node: the benchmark table of the seeds (MHA, GQA 8 and 4), a short search
# with the mutation operator from sm90, and a transfer sweep of its best version to GQA groups 4 and 8.
#
#   scripts/gpu_e2e.sh [WHEELHOUSE=.whl]     results in $OUT (default outputs/gpu_e2e)
# The wheelhouse (slurm/wheelhouse.sh) supplies what an offline node lacks; omit it where avo is installed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-outputs/gpu_e2e}; mkdir -p "$OUT"
wheels=${1:-.whl}
if [ -d "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/avo-site \
    "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/avo-site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.draw,temperature.gpu --format=csv | tee "$OUT"/gpu.txt
t0=$(date +%s)
python3 -m avo.bench kernel=mha 'seeds=[sm80,sm90]' out="$OUT"/bench_mha 2>&1 | tee "$OUT"/bench_mha.log
python3 -m avo.bench kernel=gqa group=8 'seeds=[sm80,sm90]' out="$OUT"/bench_gqa8 2>&1 | tee "$OUT"/bench_gqa8.log
python3 -m avo.bench kernel=gqa group=4 'seeds=[sm80,sm90]' out="$OUT"/bench_gqa4 2>&1 | tee "$OUT"/bench_gqa4.log
t1=$(date +%s)
python3 -m avo.launch agent=mutation seed=sm90 search.max_steps=6 search.attempts_per_step=2 hydra.run.dir="$OUT"/runs/mha 2>&1 | tee "$OUT"/search_mha.log
t2=$(date +%s)
python3 -m avo.launch -m agent=mutation kernel=gqa group=4,8 seed="$OUT"/runs/mha search.max_steps=3 search.attempts_per_step=2 hydra.sweep.dir="$OUT"/runs/gqa_sweep 2>&1 | tee "$OUT"/transfer.log
t3=$(date +%s)
echo "bench_s=$((t1-t0)) search_s=$((t2-t1)) transfer_s=$((t3-t2))" | tee "$OUT"/times.txt
