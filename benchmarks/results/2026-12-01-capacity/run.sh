#!/bin/bash
# The capacity measurement of the README (CPU, float32, one torch thread; 2026-12-01):
#   N=1: first target 1 token,  at most 300 Adam steps per stage   (16 min wall)
#   N=2: first target 8 tokens, at most 200 Adam steps per stage   (19 min wall)
# Both: lr 0.2, check every 10 steps, targets grow x1.5, texts c00, c02, ..., c14 of data/cramming/capacity.jsonl.
set -e
cd "$(dirname "$0")/../../.."
D=benchmarks/results/2026-12-01-capacity
run() {  # N FIRST MAX_STEPS
  .venv/bin/python -c "import sys, torch; torch.set_num_threads(1); from gradmem_fast.cli import main; sys.exit(main(sys.argv[1:]))" \
    capacity --model smollm2-135m-instruct --memory-tokens "$1" --input $D/texts.jsonl \
    --output $D/results_n$1.json --force --device cpu --dtype float32 \
    --first "$2" --grow 1.5 --max-steps "$3" --lr 0.2 --check-every 10
  .venv/bin/python $D/plot.py $D/results_n$1.json $D/capacity_n$1.png
}
run 1 1 300
run 2 8 200
