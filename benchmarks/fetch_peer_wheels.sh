#!/usr/bin/env bash
# Download the peers' wheels for a GPU machine that cannot download (run here, where PyPI is reachable):
#
#   bash benchmarks/fetch_peer_wheels.sh          # -> benchmarks/wheels/*.whl (~1 MB, git-ignored)
#
# The pins are benchmarks/peers.py's WHEEL_PINS (liger-kernel, cut-cross-entropy, jvp-flash-attention): pure-
# Python wheels (py3-none-any, so no platform flags), fetched with `pip download --no-deps` (their own needs,
# torch and triton, are on the GPU machine already). Then name the folder in the device tool's carry
# (`carry: ["benchmarks/wheels"]`); benchmarks/gpu_suite.sh installs them there with
# `pip install --no-index --no-deps --find-links benchmarks/wheels --target /tmp/gradmem-peers`.
# They are not in requirements-cpu.txt: benchmark-only, and their kernels run on CUDA only.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DEST=benchmarks/wheels
# The pins, read from peers.py without importing it (that would import torch).
mapfile -t PINS < <("$PY" - <<'PYEOF'
import ast

with open("benchmarks/peers.py") as f:
    tree = ast.parse(f.read())
for node in tree.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "WHEEL_PINS":
        for name, version in ast.literal_eval(node.value).items():
            print(f"{name}=={version}")
PYEOF
)
if [ "${#PINS[@]}" -eq 0 ]; then echo "fetch_peer_wheels: no WHEEL_PINS found in benchmarks/peers.py" >&2; exit 2; fi
mkdir -p "$DEST"
# One version of each: an older wheel beside the new pin would make the offline install ambiguous.
for pin in "${PINS[@]}"; do
    stem=$(echo "${pin%%==*}" | tr '-' '_')
    find "$DEST" -maxdepth 1 -name "${stem}-*.whl" ! -name "${stem}-${pin##*==}-*" -delete
done
"$PY" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d "$DEST" "${PINS[@]}"
for whl in "$DEST"/*.whl; do
    case "$whl" in
        *-py3-none-any.whl) ;;
        *) echo "fetch_peer_wheels: $whl is not pure Python: it will not install on another platform" >&2 ;;
    esac
done
ls -l "$DEST"/*.whl
du -sh "$DEST"
