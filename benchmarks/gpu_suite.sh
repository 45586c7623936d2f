#!/usr/bin/env bash
# The GPU validation suite: tests on CUDA, compute-sanitizer, all benchmarks, plots and a report, in one go.
#
#   bash benchmarks/gpu_suite.sh                    # all stages: env tests sanitizer bench report (<= 25 min)
#   bash benchmarks/gpu_suite.sh tests              # some stages only (e.g. to fit 10-minute calls)
#   GRADMEM_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh   # CPU rehearsal: no tests, tiny benchmarks
#
# Results go to $GRADMEM_RESULTS_DIR (default benchmarks/results/<date>-<gpu>/): results.json/.csv, PNGs,
# report.md, pytest.txt, sanitizer-*.txt, env.txt, bench.log and suite_status.tsv (one line per stage:
# name, exit code, seconds, time, note). Stages run in the order given; a failing stage never stops the
# next one. Every stage has a hard timeout (seconds, environment overrides):
#   GRADMEM_T_TESTS=380  GRADMEM_T_MEMCHECK=140  GRADMEM_T_RACECHECK=90  GRADMEM_T_BENCH=840
# (24.2 minutes of timeouts in all; env and report take seconds).
# GRADMEM_BENCH_ARGS adds arguments to `python -m benchmarks.run` (e.g. "--sections write --budget-scale 2").
# GRADMEM_COMMIT names the commit when the tree was copied without .git.
# The machine's own python/torch/triton/transformers are used (PYTHON overrides the interpreter); the
# package runs from this working tree through PYTHONPATH; nothing is downloaded.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in python python3; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ]; then echo "gpu_suite: no python found" >&2; exit 2; fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DRY=${GRADMEM_SUITE_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    DRY_FLAG=--dry-run
else
    unset TRITON_INTERPRET
    DRY_FLAG=
fi

T_TESTS=${GRADMEM_T_TESTS:-380}
T_MEMCHECK=${GRADMEM_T_MEMCHECK:-140}
T_RACECHECK=${GRADMEM_T_RACECHECK:-90}
T_BENCH=${GRADMEM_T_BENCH:-840}
BENCH_ARGS=${GRADMEM_BENCH_ARGS:-}

if [ $# -gt 0 ]; then STAGES=("$@"); else STAGES=(env tests sanitizer bench report); fi

OUT=${GRADMEM_RESULTS_DIR:-}
if [ -z "$OUT" ]; then
    OUT=$("$PY" -m benchmarks.run --print-default-dir $DRY_FLAG 2>/dev/null | tail -n 1)
fi
if [ -z "$OUT" ]; then OUT="$ROOT/benchmarks/results/$(date +%F)-unknown"; fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
STATUS="$OUT/suite_status.tsv"
echo "gradmem-fast GPU suite -> $OUT (stages: ${STAGES[*]}${DRY_FLAG:+, dry run})"

record() {  # stage rc seconds note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$4" >>"$STATUS"
    echo "== stage $1: exit $2 in ${3}s${4:+ ($4)}"
}

stage_env() {
    {
        echo "# date: $(date -u)"
        echo "# commit: ${GRADMEM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
        echo "# python: $PY ($("$PY" --version 2>&1))"
        "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "numpy", "pytest", "pytest_benchmark", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
        echo "# nvidia-smi"
        nvidia-smi 2>&1 || echo "nvidia-smi not available"
        echo "# compute-sanitizer"
        compute-sanitizer --version 2>&1 || echo "compute-sanitizer not available"
    } >"$OUT/env.txt" 2>&1
    return 0
}

stage_tests() {
    if [ "$DRY" = 1 ]; then
        NOTE="dry run: skipped (the CPU test suite is what runs this rehearsal)"
        return 0
    fi
    timeout -k 15 "$T_TESTS" env GRADMEM_TEST_DEVICE=cuda "$PY" -m pytest -q tests -p no:cacheprovider -rs \
        --durations=25 --junitxml="$OUT/pytest.xml" >"$OUT/pytest.txt" 2>&1
    local rc=$?
    tail -n 3 "$OUT/pytest.txt"
    [ $rc -eq 124 ] && NOTE="timed out after ${T_TESTS}s"
    return $rc
}

stage_sanitizer() {
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        local device=cuda
        [ "$DRY" = 1 ] && device=cpu
        "$PY" benchmarks/sanitizer_cases.py --device "$device" --json "$OUT/sanitizer-none.json" \
            >"$OUT/sanitizer-none.txt" 2>&1
        local rc=$?
        NOTE="compute-sanitizer not found: cases run without it"
        cat "$OUT/sanitizer-none.txt" | grep '^CASE' || true
        return $rc
    fi
    local rc=0 one
    # memcheck: every case; the caching allocator off so an out-of-bounds access is not hidden in a pool.
    timeout -k 15 "$T_MEMCHECK" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 86 --print-limit 100 "$PY" benchmarks/sanitizer_cases.py --device cuda \
        --json "$OUT/sanitizer-memcheck.json" >"$OUT/sanitizer-memcheck.txt" 2>&1
    one=$?
    grep -E '^CASE|ERROR SUMMARY' "$OUT/sanitizer-memcheck.txt" || true
    [ $one -ne 0 ] && rc=$one
    # racecheck: the kernels only (shared-memory hazards), not the model-level cases.
    timeout -k 15 "$T_RACECHECK" compute-sanitizer --tool racecheck --error-exitcode 86 --print-limit 100 \
        "$PY" benchmarks/sanitizer_cases.py --device cuda --case attention_padded --case attention_varlen \
        --case attention_dropout_window --case linear_cross_entropy --case memory_update \
        --json "$OUT/sanitizer-racecheck.json" >"$OUT/sanitizer-racecheck.txt" 2>&1
    one=$?
    grep -E '^CASE|RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer-racecheck.txt" || true
    [ $one -ne 0 ] && [ $rc -eq 0 ] && rc=$one
    [ $rc -eq 86 ] && NOTE="sanitizer reported errors"
    [ $rc -eq 124 ] && NOTE="a sanitizer run timed out"
    return $rc
}

stage_bench() {
    # shellcheck disable=SC2086
    timeout -k 20 "$T_BENCH" "$PY" -m benchmarks.run --out "$OUT" $DRY_FLAG $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
    local rc=${PIPESTATUS[0]}
    [ $rc -eq 124 ] && NOTE="timed out after ${T_BENCH}s (results so far are in results.json)"
    return $rc
}

stage_report() {
    if [ ! -f "$OUT/results.json" ]; then
        NOTE="no results.json yet"
        return 0
    fi
    "$PY" -m benchmarks.plots "$OUT" >/dev/null || true
    "$PY" -m benchmarks.report --results "$OUT" --out "$OUT/report.md" >/dev/null
}

SUITE_RC=0
for stage in "${STAGES[@]}"; do
    case "$stage" in
        env | tests | sanitizer | bench | report) ;;
        *) echo "gpu_suite: unknown stage '$stage' (env tests sanitizer bench report)" >&2; SUITE_RC=2; continue ;;
    esac
    NOTE=""
    start=$(date +%s)
    echo "== stage $stage"
    "stage_$stage"
    rc=$?
    record "$stage" "$rc" "$(($(date +%s) - start))" "$NOTE"
    [ $rc -ne 0 ] && SUITE_RC=1
done

echo
echo "== suite status ($STATUS)"
cat "$STATUS"
if [ -f "$OUT/report.md" ]; then
    echo
    cat "$OUT/report.md"
fi
echo "results: $OUT"
exit $SUITE_RC
