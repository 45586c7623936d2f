#!/bin/bash
# The capacity measurement of the README (CPU, float32, one torch thread), N=1 then N=2 memory vectors.
set -e
cd "$(dirname "$0")/../../.."
D=benchmarks/results/2026-12-01-capacity
for N in "$@"; do
  OMP_NUM_THREADS=1 .venv/bin/python -c "import torch, sys; torch.set_num_threads(1); from gradmem_fast.cli import main; sys.exit(main(sys.argv[1:]))" \
    capacity --model smollm2-135m-instruct --memory-tokens "$N" --input $D/texts.jsonl \
    --output $D/results_n$N.json --force --device cpu --dtype float32 \
    --first "${FIRST:-1}" --grow 1.5 --max-steps "${MAX_STEPS:-300}" --lr 0.2 --check-every 10
  .venv/bin/python $D/plot.py $D/results_n$N.json $D/capacity_n$N.png
done
