#!/usr/bin/env bash
# Bring the published GradMem code (github.com/yurakuratov/gradmem: grad_memgpt.py, class GradMemGPT) next to
# this checkout for benchmarks/bench_meta_peer.py, without committing any of it:
#
#   bash benchmarks/peers/setup_gradmem.sh [SOURCE] [DEST]
#
# SOURCE: a git repository to clone (a path or URL; env GRADMEM_PEER_SOURCE; default the bare mirror the search
#         tool's `fetch` made: /work/.mirror/yurakuratov+gradmem/repo).
# DEST:   where the clone goes (env GRADMEM_PEER_DIR; default out/peers/gradmem, git-ignored through /out/).
#
# Python: the peer needs torch, transformers >= 4.56 (AttentionInterface, AttentionMaskInterface,
# masking_utils.sdpa_mask, integrations.sdpa_attention.repeat_kv), triton (its attn_double_bwd kernels are
# imported at module load) and optionally peft (only for its write LoRA, unused here). When our .venv imports
# grad_memgpt as it is (torch 2.13 CPU, transformers 5.x, triton 3.6 on this machine: it does), the peer runs in
# .venv and nothing is installed. Otherwise a venv of its own (DEST/.venv, with --system-site-packages off) gets
# torch, transformers and triton from PyPI, and the script prints the python to use
# (run bench_meta_peer.py under that python with PYTHONPATH=. from this checkout).
# A GPU machine without network: run this here, then carry out/peers/gradmem (the clone is ~2 MB).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SOURCE=${1:-${GRADMEM_PEER_SOURCE:-/work/.mirror/yurakuratov+gradmem/repo}}
DEST=${2:-${GRADMEM_PEER_DIR:-out/peers/gradmem}}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

if [ -f "$DEST/grad_memgpt.py" ]; then
    echo "setup_gradmem: $DEST already holds a clone ($(git -C "$DEST" rev-parse --short HEAD 2>/dev/null || echo '?'))"
else
    if [ -e "$DEST" ] && [ -n "$(ls -A "$DEST" 2>/dev/null)" ]; then
        echo "setup_gradmem: $DEST exists and is not a clone of the published code; remove it or pick another DEST" >&2
        exit 2
    fi
    mkdir -p "$(dirname "$DEST")"
    tmp="$DEST.partial.$$"
    rm -rf "$tmp"
    git clone --quiet "$SOURCE" "$tmp"   # into a temporary name first: a failed clone leaves no DEST behind
    mv "$tmp" "$DEST"
    echo "setup_gradmem: cloned $SOURCE -> $DEST ($(git -C "$DEST" rev-parse --short HEAD))"
fi
rc=0
git check-ignore -q "$DEST" 2>/dev/null || rc=$?
if [ "$rc" -eq 1 ]; then  # 0: ignored; 128: outside this checkout
    echo "setup_gradmem: warning: $DEST is inside the checkout and not git-ignored; never commit the peer's code" >&2
fi

if PYTHONPATH="$DEST" "$PY" -c "import grad_memgpt" >/dev/null 2>&1; then
    echo "setup_gradmem: $PY imports grad_memgpt: the peer runs in our venv (nothing installed)"
    echo "PEER_PYTHON=$PY"
    exit 0
fi
echo "setup_gradmem: $PY cannot import grad_memgpt; making $DEST/.venv"
python3 -m venv "$DEST/.venv"
"$DEST/.venv/bin/python" -m pip install --quiet --disable-pip-version-check torch "transformers>=4.56" triton safetensors
PYTHONPATH="$DEST" "$DEST/.venv/bin/python" -c "import grad_memgpt"
echo "PEER_PYTHON=$DEST/.venv/bin/python"
