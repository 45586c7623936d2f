#!/bin/bash
# How results.json / table.md here were made (2-core CPU shared with other agents' test runs, load 7-10:
# every process got 10-15% of a core, so CPU time is the figure; scaled down from 24 to 4 paragraphs and from
# 8 to 1 capacity text to finish in the session: see the README section "Cramming beside progressive_cramming").
# Phases ran as parallel processes on one work folder; `report` gathers them (each run's record.json keeps
# the exact command, CPU and wall time).
set -e
cd "$(dirname "$0")/../../.."
bash benchmarks/peers/setup_progressive_cramming.sh          # peer commit f642f89712e2 (results.json: peer.commit)
W=/work/scratch/peerbench/work2
A="--work $W --count 4 --capacity-count 1 --probe-batches 1,2,4 --probe-steps 12"
P=".venv/bin/python -m benchmarks.bench_cramming_peers $A"
$P --phases model,data
$P --phases cram-peer-1 &
$P --phases cram-ours,cap-ours &
$P --phases cap-peer,cap-peer-geo &
$P --phases probe &
$P --peer-batches 4 --phases cram-peer-batches &
wait
$P --phases report --out benchmarks/results/2026-12-07-cramming-peers
# The lower-load pair in pair-b2/ (ours and the peer at batch 2, side by side, a fresh work folder):
W3=/work/scratch/peerbench/work3
A3="--work $W3 --count 4 --capacity-count 1"
.venv/bin/python -m benchmarks.bench_cramming_peers $A3 --phases cram-ours &
.venv/bin/python -m benchmarks.bench_cramming_peers $A3 --peer-batches 2 --phases cram-peer-batches &
wait
.venv/bin/python -m benchmarks.bench_cramming_peers $A3 --phases report --out benchmarks/results/2026-12-07-cramming-peers/pair-b2
