#!/usr/bin/env bash
# Train under MPI: mpiexec starts the ranks, pyramidion_ds.dist reads them from the MPI launcher's
# variables (Open MPI's OMPI_COMM_WORLD_*, MPICH/Hydra's PMI_RANK) or from mpi4py.
#
#   launch/mpi/train.sh CONFIG.yaml [overrides...]                   # 2 ranks on this machine
#   NPROC=16 MPIEXEC="mpirun --hostfile hosts -x PATH -x PYTHONPATH" launch/mpi/train.sh CONFIG.yaml
#
# NPROC: number of ranks (default 2). MPIEXEC: the launcher and its options (default mpiexec; the
# `mpich` wheel in the venv provides one). PYTHON: the interpreter (default python).
# Open MPI's mpirun does not forward environment variables to other nodes unless named with -x.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# `-m mpi4py` turns an error on one rank into MPI_Abort, so the other ranks stop instead of waiting.
# shellcheck disable=SC2086  # MPIEXEC is a command line on purpose
exec ${MPIEXEC:-mpiexec} -n "${NPROC:-2}" "${PYTHON:-python}" -m mpi4py -m pyramidion_ds.cli.train "$@"
