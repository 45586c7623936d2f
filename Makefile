# The two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv lint format typecheck compile-check test-kernels-full test-compile clean

venv:
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(PY) -m gradmem_fast demo

test: venv lint typecheck
	$(PY) -m pytest -q tests
	env -u TRITON_INTERPRET $(PY) -m gradmem_fast.tools.compile_check

# Lint + import order + format check (ruff.toml), and the type check of the public API (mypy.ini). Both run
# before the tests in make test. A venv without ruff/mypy (a GPU machine that reused its own packages, see
# scripts/setup_venv.sh) skips them with a message instead of failing: the pins are in requirements-cpu.txt.
lint: venv
	@if [ -x $(VENV)/bin/ruff ]; then $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .; \
	else echo "make lint: SKIPPED, ruff is not installed in $(VENV) (pip install -r requirements-cpu.txt)"; fi

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: venv
	@if [ -x $(VENV)/bin/mypy ]; then $(VENV)/bin/mypy --config-file mypy.ini; \
	else echo "make typecheck: SKIPPED, mypy is not installed in $(VENV) (pip install -r requirements-cpu.txt)"; fi

# Every GPU table configuration on every tile-edge geometry in the interpreter, and a longer property-based
# search (make test runs a sample in which each configuration runs once).
test-kernels-full: venv
	GRADMEM_KERNELS_FULL=1 $(PY) -m pytest -q tests/test_kernel_tiles.py

# Plant known one-line bugs in kernels and ops (scratch copy) and check that the tests kill every one.
.PHONY: mutants
mutants: venv
	$(PY) scripts/mutants.py

# Compiled write step against the eager engine with inductor on all five families and both op backends
# (make test runs inductor on two of them and aot_eager on the rest: cold C++ compiles are slow on 2 cores).
test-compile: venv
	GRADMEM_TEST_INDUCTOR=all $(PY) -m pytest -q tests/test_engine_compile.py

compile-check: venv
	env -u TRITON_INTERPRET $(PY) -m gradmem_fast.tools.compile_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
