#!/bin/bash
# Capacity with the cramming paper's convention (--given-tokens 1: each text's first token is given after
# the memory, the memory's own position predicts nothing), otherwise the settings of 2026-12-01-capacity
# for N=1: first target 1 token, at most 300 Adam steps per stage, lr 0.2, check every 10 steps, x1.5,
# texts c00, c02, ..., c14 of data/cramming/capacity.jsonl; CPU, float32, one torch thread.
set -e
cd "$(dirname "$0")/../../.."
D=benchmarks/results/2026-12-02-capacity-given
.venv/bin/python -c "import sys, torch; torch.set_num_threads(1); from gradmem_fast.cli import main; sys.exit(main(sys.argv[1:]))" \
  capacity --model smollm2-135m-instruct --memory-tokens 1 --input $D/texts.jsonl \
  --output $D/results_n1.json --force --device cpu --dtype float32 \
  --first 1 --grow 1.5 --max-steps 300 --lr 0.2 --check-every 10 --given-tokens 1
.venv/bin/python benchmarks/results/2026-12-01-capacity/plot.py $D/results_n1.json $D/capacity_n1.png
