#!/usr/bin/env bash
# Install the peer progressive_cramming (FusionBrainLab/progressive_cramming, MIT; Progressive Cramming, ICML
# 2026) beside this checkout, in its own virtual environment, for benchmarks/bench_cramming_peers.py.
#
#   bash benchmarks/peers/setup_progressive_cramming.sh [SOURCE]
#
# SOURCE (argument, or PEER_SOURCE; default the search tool's bare mirror
# /work/.mirror/FusionBrainLab+progressive_cramming/repo): any path or URL `git clone` takes.
# PEER_DIR (default benchmarks/peers/progressive_cramming, git-ignored): where its code and venv go.
# PEER_REF: a commit or branch to check out (default the source's HEAD).
#
# What it does, and why:
# * clones without a work tree and checks out only the package (src/, scripts/, pyproject.toml, LICENSE,
#   README.md): the mirror lacks the blobs of the project page's videos, which the benchmark never needs.
#   Its code is never committed here (the folder is in .gitignore).
# * makes its own venv, PEER_DIR/.venv, and pins what it installs there from PyPI:
#   scikit-learn==1.9.1 and tensorboard==2.21.0 (the peer imports both at load time).
# * torch, transformers, datasets, accelerate, numpy, tqdm (the peer's other requirements: torch>=2.9,
#   transformers>=4.57.1, datasets>=4.3, accelerate>=0.26) are reused from a base site-packages, appended
#   to the venv's path by a .pth file *after* its own site-packages: PEER_BASE_SITE (default this checkout's
#   .venv, i.e. torch 2.13.0+cpu, transformers 5.17.0 here). That is how it works offline and without a
#   2 GB CUDA torch from PyPI, and both sides then run the same torch kernels. PEER_BASE_SITE=none installs
#   the peer's full requirement list from PyPI into its venv instead (pinned below; needs the network).
# * the peer's package is put on the venv's path by a second .pth file (PEER_DIR/src): no build step.
# Prints the venv's python on its last line.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SOURCE=${1:-${PEER_SOURCE:-/work/.mirror/FusionBrainLab+progressive_cramming/repo}}
PEER_DIR=${PEER_DIR:-$ROOT/benchmarks/peers/progressive_cramming}
PY=${PYTHON:-python3}
BASE_SITE=${PEER_BASE_SITE:-}
if [ -z "$BASE_SITE" ] && [ -x "$ROOT/.venv/bin/python" ]; then
    BASE_SITE=$("$ROOT/.venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
fi
PINNED_EXTRA=(scikit-learn==1.9.1 tensorboard==2.21.0)
PINNED_FULL=(torch==2.13.0 transformers==5.17.0 datasets==5.2.0 accelerate==1.15.0 numpy==2.4.6 tqdm==4.70.1)

if [ ! -d "$PEER_DIR/.git" ]; then
    echo "== cloning $SOURCE into $PEER_DIR"
    git clone --quiet --no-checkout "$SOURCE" "$PEER_DIR"
fi
cd "$PEER_DIR"
REF=${PEER_REF:-HEAD}
git checkout --quiet "$REF" -- src scripts pyproject.toml LICENSE README.md
echo "== peer commit $(git rev-parse "$REF")"

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY=$PEER_DIR/.venv/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PEER_DIR/src" > "$SITE/progressive_cramming_src.pth"
if [ "$BASE_SITE" = none ]; then
    rm -f "$SITE/zz_base_site.pth"
    "$VPY" -m pip install --quiet "${PINNED_FULL[@]}" "${PINNED_EXTRA[@]}"
else
    if [ ! -d "$BASE_SITE" ]; then
        echo "setup_progressive_cramming: PEER_BASE_SITE $BASE_SITE is not a folder (or set it to none)" >&2
        exit 2
    fi
    # zz_: .pth files are read in name order; the base comes after the venv's own packages either way.
    echo "$BASE_SITE" > "$SITE/zz_base_site.pth"
    "$VPY" -m pip install --quiet "${PINNED_EXTRA[@]}"
fi
"$VPY" - <<'PY'
import importlib.metadata as md
import progressive_cramming.run  # noqa: F401  (imports the trainers: fails here, not in the benchmark)
for name in ("torch", "transformers", "datasets", "accelerate", "scikit-learn", "tensorboard"):
    print(f"   {name} {md.version(name)}")
PY
echo "$VPY"
