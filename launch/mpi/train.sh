#!/usr/bin/env bash
# Train under MPI: mpiexec starts the ranks, pyramidion_ds.distributed reads them from the MPI launcher's
# variables (Open MPI's OMPI_COMM_WORLD_*, MPICH/Hydra's PMI_RANK) or from mpi4py.
#
#   launch/mpi/train.sh CONFIG.yaml [overrides...]                   # 2 ranks on this machine
#   NPROC=16 MPIEXEC="mpirun --hostfile hosts -x PATH -x PYRAMIDION_PYTHON" launch/mpi/train.sh CONFIG.yaml
#
# NPROC: number of ranks (default 2). MPIEXEC: the launcher and its options (default: mpiexec on PATH;
# the `mpich` wheel puts one in the venv's bin/, next to its python). PYRAMIDION_PYTHON: the
# interpreter with pyramidion_ds and mpi4py (default python3 on PATH; PYTHON is read too, for older
# setups). Open MPI's mpirun does not forward environment variables to other nodes unless named with -x.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, also when not pip-installed
py=${PYRAMIDION_PYTHON:-${PYTHON:-python3}}
command -v "$py" >/dev/null 2>&1 || { echo "train.sh: error: PYRAMIDION_PYTHON='$py' is not an executable" >&2; exit 2; }
mpiexec=${MPIEXEC:-mpiexec}
command -v "${mpiexec%% *}" >/dev/null 2>&1 || {
  echo "train.sh: error: '${mpiexec%% *}' not found; put an MPI launcher on PATH (e.g. activate the venv with the mpich wheel) or set MPIEXEC" >&2
  exit 2
}
# bad input is one line here, in seconds, before any rank starts (the ranks check again)
"$py" -m pyramidion_ds.cli.train --check-only --world-size "${NPROC:-2}" "$@" || exit $?
echo "train.sh: ${NPROC:-2} MPI ranks via $mpiexec, $py: $*"
# `-m mpi4py` turns an error on one rank into MPI_Abort, so the other ranks stop instead of waiting.
# shellcheck disable=SC2086  # MPIEXEC is a command line on purpose
exec $mpiexec -n "${NPROC:-2}" "$py" -m mpi4py -m pyramidion_ds.cli.train "$@"
