#!/usr/bin/env bash
# Create ./.venv with everything pyramidion_ds needs (idempotent). Used by the quick start and CI.
#   CPU machines: torch comes from the pinned CPU build (TORCH_SPEC, default torch==2.13.0).
#   GPU clusters: install the CUDA torch your drivers want first, then run with TORCH_SPEC=skip.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${VENV:-$root/.venv}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
if ! "$py" -c 'import pyramidion_ds, torch, deepspeed, sentencepiece, mpi4py' 2>/dev/null; then
  "$py" -m pip install -q --upgrade pip
  [ "$torch_spec" = skip ] || "$py" -m pip install -q "$torch_spec"
  "$py" -m pip install -q -e "$root[dev]"
fi
"$py" -c 'import torch, deepspeed; print(f"environment ready: {torch.__version__=} {deepspeed.__version__=}")'
