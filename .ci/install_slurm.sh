#!/usr/bin/env bash
# Install a local SLURM (Debian's slurm-wlm, 22.05 on bookworm) and munge for tests/cluster.
# Idempotent: skips apt when the binaries are present, creates a munge key only if none exists.
# The daemons are NOT started here; tests/cluster/conftest.py starts and stops its own.
set -euo pipefail

need_install=0
for bin in slurmctld slurmd sbatch srun scontrol sinfo munged; do
    command -v "$bin" >/dev/null 2>&1 || need_install=1
done

if [ "$need_install" = 1 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    # slurm-wlm pulls slurmctld + slurmd + client; munge is its authentication. Where systemd runs,
    # the packages may start their own services (slurmd/slurmctld then fail for want of
    # /etc/slurm/slurm.conf): harmless, the tests run their own daemons, config and munge socket.
    $SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

# munge needs a key readable only by its owner; the packaged postinst usually creates one.
KEY=/etc/munge/munge.key
if [ ! -s "$KEY" ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        $SUDO mungekey --create --keyfile="$KEY" --force
    else
        $SUDO dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none
    fi
    $SUDO chmod 0400 "$KEY"
    id munge >/dev/null 2>&1 && $SUDO chown munge:munge "$KEY" || true
fi

echo "slurm: $(slurmd -V 2>/dev/null || echo missing); munge: $(munged --version 2>&1 | head -1)"
