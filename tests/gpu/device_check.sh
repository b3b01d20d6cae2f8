#!/usr/bin/env bash
# The GPU proof kit (issue 18): one call proves distlib's CUDA paths on a one-GPU machine.
#
#   bash tests/gpu/device_check.sh                 # everything, within about 8 minutes
#   OUT=/some/folder bash tests/gpu/device_check.sh  # summary.json and logs go there
#
# It installs nothing: distlib runs from this working tree (PYTHONPATH). Pure-Python packages the
# GPU machine's image lacks (cloudpickle, torchao) are taken from .gpu-deps/ when it exists; fill it
# beforehand with `bash tests/gpu/prepare_deps.sh` and carry it to the machine.
# Without CUDA it says "no CUDA: skipped", still checks that the kit itself works (the GPU tests
# collect, each GPU benchmark runs its tiny CPU dry run) and exits 0: the test suite runs it so.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$root/.gpu-deps" ]; then
    export PYTHONPATH="$PYTHONPATH:$root/.gpu-deps"
fi
exec "${PYTHON:-python3}" "$root/tests/gpu/device_check.py" "$@"
