"""What every console script shares: config + dotted overrides, one-line errors, exit codes.

The errors and exit codes themselves live in ``pyramidion_ds/errors.py`` (library code raises them too)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn

from ..config import Config, ConfigError, field_help
from ..distributed.env import DistEnvError, local_rank_from_env
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE, DataError, UsageError


def fail(prog: str, message: str, code: int = EXIT_USAGE, every_rank: bool = False) -> NoReturn:
    """Print ``prog: error: message`` and exit with ``code``. Bad input is the same on every rank of a node
    (same files, same config): only the node's first process prints it, unless ``every_rank``."""
    if every_rank or local_rank_from_env() == 0:
        print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_main(prog: str, body: Callable[[], int | None]) -> NoReturn:
    """Run a command body, turning the errors a user can fix into one line and an exit code."""
    try:
        code = body()
    except (ConfigError, DataError, DistEnvError, UsageError, FileNotFoundError) as err:
        # a launcher problem can differ between processes (each reads its own environment): all print it
        fail(
            prog, str(err).splitlines()[0] if str(err) else type(err).__name__, every_rank=isinstance(err, DistEnvError)
        )
    except KeyboardInterrupt:
        fail(prog, "interrupted", EXIT_ERROR)
    raise SystemExit(code or EXIT_OK)


def config_epilog() -> str:
    """The list of config keys, shown under --help of every command that takes a config."""
    lines = ["config keys (set in the YAML file or override as --section.key VALUE):"]
    for key, help_text, default in field_help(Config):
        lines.append(f"  --{key:<40} {help_text} (default: {default!r})")
    return "\n".join(lines)


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser taking a config (path or shipped name) and leaving ``--section.key`` overrides alone."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=config_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "config", nargs="?", default=None, help="YAML config file, or the name of a shipped config (see --list-configs)"
    )
    parser.add_argument("--list-configs", action="store_true", help="list the shipped configs and exit")
    return parser


def default_threads(environ: dict | None = None, cores: int | None = None) -> None:
    """Unless the user set them: ``OMP_NUM_THREADS`` = the cores this process owns (SLURM's
    ``SLURM_CPUS_PER_TASK``, else this process's CPUs shared by the launcher's processes on the node), and
    ``OMP_WAIT_POLICY=PASSIVE``. Call it before torch is imported (torch reads them once).

    Torch's default is every core of the machine in every process, each OpenMP thread spinning at every
    barrier: on a machine loaded by other jobs a barrier then waits for a descheduled thread, and
    decoding took 12-120x longer (docs/troubleshooting.md has the figures); passive threads sleep instead."""
    if environ is None:
        if "torch" in sys.modules:  # too late (and a test calling main() in-process keeps its environment)
            return
        environ = os.environ
    if "OMP_NUM_THREADS" not in environ:
        cores = cores or len(os.sched_getaffinity(0))
        per_node = next((environ[k] for k in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE") if environ.get(k, "").isdigit()), "1")
        owned = environ.get("SLURM_CPUS_PER_TASK", "")
        environ["OMP_NUM_THREADS"] = owned if owned.isdigit() else str(max(1, cores // max(1, int(per_node))))
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
