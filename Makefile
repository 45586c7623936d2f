# The two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv lint format typecheck docs compile-check test-kernels-full test-compile clean

venv:
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(PY) -m gradmem_fast demo

# The interpreter tests keep one core busy and leave the other mostly idle, so the compile check runs beside
# them on one job (its log is printed after pytest); make test fails if either fails.
PYTEST_ARGS ?= tests
# Soft-capped entries (SOFTCAP constexpr) double the attention list: make test compiles the fp16 d64 ones as a
# sample, make compile-check every one.
COMPILE_CHECK_ARGS ?= --match '^(?!.*_softcap)|_fp16_d64_.*_softcap'
test: venv lint typecheck
	@log=$$(mktemp); \
	env -u TRITON_INTERPRET $(PY) -m gradmem_fast.tools.compile_check --jobs 1 $(COMPILE_CHECK_ARGS) > $$log 2>&1 & cc=$$!; \
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	wait $$cc; ccrc=$$?; cat $$log; rm -f $$log; \
	if [ $$rc -ne 0 ] || [ $$ccrc -ne 0 ]; then echo "make test: pytest exit $$rc, compile check exit $$ccrc"; exit 1; fi
	@$(MAKE) --no-print-directory docs

# Lint + import order + format check (ruff.toml), and the type check of the public API (mypy.ini). Both run
# before the tests in make test. A venv without ruff/mypy (a GPU machine that reused its own packages, see
# scripts/setup_venv.sh) skips them with a message instead of failing: the pins are in requirements-cpu.txt.
lint: venv
	@if [ -x $(VENV)/bin/ruff ]; then $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .; \
	else echo "make lint: SKIPPED, ruff is not installed in $(VENV) (pip install -r requirements-cpu.txt)"; fi

# The documentation site (mkdocs.yml, docs/): --strict fails on broken links, missing references and API names
# that do not resolve; built into site/ (git-ignored). Skipped with a message where mkdocs is not installed.
docs: venv
	@if [ -x $(VENV)/bin/mkdocs ]; then NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet && echo "make docs: site/ built"; \
	else echo "make docs: SKIPPED, mkdocs is not installed in $(VENV) (pip install -r requirements-cpu.txt)"; fi

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: venv
	@if [ -x $(VENV)/bin/mypy ]; then $(VENV)/bin/mypy --config-file mypy.ini; \
	else echo "make typecheck: SKIPPED, mypy is not installed in $(VENV) (pip install -r requirements-cpu.txt)"; fi

# Every GPU table configuration on every tile-edge geometry in the interpreter, and a longer property-based
# search (make test runs a sample in which each configuration runs once).
test-kernels-full: venv
	GRADMEM_KERNELS_FULL=1 $(PY) -m pytest -q tests/test_kernel_tiles.py tests/test_attention_boundaries.py

# Every combination of the WRITE options (update op and whole write, reference and engine) against the
# independent fp64 loop of tests/test_option_matrix.py (make test runs a pairwise-covering sample).
.PHONY: test-options
test-options: venv
	GRADMEM_OPTIONS_FULL=1 $(PY) -m pytest -q tests/test_option_matrix.py

# Every causal-LM family transformers ships, built tiny, against its own eager forward (tests/families.py;
# make test runs a sample of 14). FAMILIES.md and benchmarks/results/families.json: scripts/family_table.py.
.PHONY: test-families
test-families: venv
	GRADMEM_FAMILIES_FULL=1 $(PY) -m pytest -q tests/test_families.py

# Mutation testing by a tool (mutmut 2.x operators, scripts/mutation.py): sampled mutants of the files where a
# one-line bug is silent, on a scratch copy of HEAD, within MUTATION_ARGS' budget; report under
# benchmarks/results/mutation/.
.PHONY: mutation
MUTATION_ARGS ?= --max 40 --budget 3600
mutation: venv
	$(PY) scripts/mutation.py --rev HEAD $(MUTATION_ARGS)

# Kernel microbenchmarks (pytest-benchmark; not part of make test, whose testpaths is tests/): attention fwd,
# fwd+bwd and double backward, linear CE fwd+bwd, memory update, each against its torch baseline and the peers,
# on this machine's device (CPU: small shapes, torch backends, one thread, ~30 s). Saved under
# benchmarks/results/pytest-benchmark/<device>/ and compared with the previous run there. Extra arguments:
# BENCH_KERNELS_ARGS (e.g. "--no-save", "-- -k attention").
.PHONY: bench-kernels
BENCH_KERNELS_ARGS ?=
bench-kernels: venv
	env -u TRITON_INTERPRET $(PY) -m benchmarks.kernel_bench $(BENCH_KERNELS_ARGS)

# Plant known one-line bugs in kernels and ops (scratch copy) and check that the tests kill every one.
.PHONY: mutants
mutants: venv
	$(PY) scripts/mutants.py

# Compiled write step against the eager engine with inductor on all five families and both op backends
# (make test runs inductor on two of them and aot_eager on the rest: cold C++ compiles are slow on 2 cores),
# the compiled step with attention dropout under inductor (aot_eager in make test), and the cramming slot
# loop on the Triton kernels in the interpreter (make test runs it on the torch ops).
test-compile: venv
	GRADMEM_TEST_INDUCTOR=all GRADMEM_TEST_SLOW_INTEGRATION=1 $(PY) -m pytest -q tests/test_engine_compile.py \
		tests/test_attention_dropout_seed.py tests/test_cramming.py::test_engine_continuous_batching_equals_alone_and_the_reference

compile-check: venv
	env -u TRITON_INTERPRET $(PY) -m gradmem_fast.tools.compile_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
