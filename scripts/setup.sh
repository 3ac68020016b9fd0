#!/usr/bin/env bash
# Create .venv (if missing) and install sparsefit with every extra into it, gpu included. On a
# machine without CUDA, torch is pinned to the CPU build first so no resolver pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install --quiet --upgrade pip
if ! command -v nvidia-smi >/dev/null 2>&1; then
    $py -m pip install --quiet "torch==2.13.0"
fi
$py -m pip install --quiet -e ".[all,gpu,trackers]"  # gpu: torchao, so the FP8 2:4 config is tested here too; trackers: each is tested
.venv/bin/python -m sparsefit.runtime  # build the sparse CPU kernels once, not inside the first test
