# The two commands: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv compile-check clean

venv:
	@VENV=$(VENV) bash scripts/setup_venv.sh

demo: venv
	$(PY) -m gradmem_fast demo

test: venv
	$(PY) -m pytest -q tests
	env -u TRITON_INTERPRET $(PY) -m gradmem_fast.tools.compile_check

# Plant known one-line bugs in kernels and ops (scratch copy) and check that the tests kill every one.
.PHONY: mutants
mutants: venv
	$(PY) scripts/mutants.py

compile-check: venv
	env -u TRITON_INTERPRET $(PY) -m gradmem_fast.tools.compile_check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
