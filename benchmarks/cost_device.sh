#!/usr/bin/env bash
# On the H200 machine, from the repository root: an evaluation's cost piece by piece (eval_cost.py), then
# attempts per hour with 4 workers (workers_throughput.py); both tables printed, JSON under $OUT. ~4 minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/avo-cost}
mkdir -p "$OUT"
tar -C /tmp -xJf .dev/site312.tar.xz
export PYTHONPATH=/tmp/site312:$PWD
echo "== eval_cost.py (3 evaluations)"
timeout 100 python benchmarks/eval_cost.py --json "$OUT/eval_cost.json" --log "$OUT/eval_cost.log" \
    || echo "eval_cost.py: exit $?"
echo "== workers_throughput.py --gpu --workers 4 --minutes 1"
timeout 160 python benchmarks/workers_throughput.py --gpu --workers 4 --minutes 1 --out /tmp/wt \
    --json "$OUT/workers.json" || echo "workers_throughput.py: exit $?"
