#!/usr/bin/env bash
# Fill .gpu-deps/ with the pure-Python packages the GPU machine's image lacks (it has no network):
# cloudpickle (distlib's launcher ships targets with it) and torchao (fp8 training). Then run the
# kit there with the folder carried: device tool `run` with carry [".gpu-deps"].
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
pip="${PIP:-$root/.venv/bin/pip}"
rm -rf "$root/.gpu-deps"
"$pip" install --quiet --no-deps --target "$root/.gpu-deps" cloudpickle "${TORCHAO_SPEC:-torchao==0.17.0}"
du -sh "$root/.gpu-deps"
