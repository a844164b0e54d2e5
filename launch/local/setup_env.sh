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
# the checks below only import deepspeed: without this it probes for a GPU and warns when it finds none
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
# (tokenizers, and ruff, pre-commit and transformers from the [dev] extra, are looked for too: a .venv made
# before they joined gets them; transformers is found, not imported, which would take seconds)
if ! "$py" -c 'import pyramidion_ds, torch, deepspeed, sentencepiece, mpi4py, tokenizers, importlib.util as u
assert u.find_spec("transformers")' 2>/dev/null \
    || [ ! -x "$venv/bin/ruff" ] || [ ! -x "$venv/bin/pre-commit" ]; then
  echo "setup_env.sh: installing torch ($torch_spec), deepspeed and pyramidion_ds[dev] into $venv" \
       "(2-3 minutes the first time; later runs find it ready)"
  "$py" -m pip install -q --upgrade pip
  [ "$torch_spec" = skip ] || "$py" -m pip install -q "$torch_spec"
  "$py" -m pip install -q -e "$root[dev]"
fi
"$py" -c 'import torch, deepspeed; print(f"environment ready: {torch.__version__=} {deepspeed.__version__=}")'
