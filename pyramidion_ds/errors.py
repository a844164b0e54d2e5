"""The errors a user can fix, and the exit codes a launcher can act on: importable from every layer.

Console scripts (``cli/common.run_main``) print a :class:`UsageError` or :class:`DataError` as one line,
``prog: error: <message>``, and exit with :data:`EXIT_USAGE`.
"""

from __future__ import annotations

#: exit codes a launcher can act on
EXIT_OK = 0
EXIT_ERROR = 1  # a run failed
EXIT_USAGE = 2  # bad input: config, flags, files
EXIT_PREEMPTED = 75  # a signal asked us to stop, a checkpoint was saved: requeue and resume


class UsageError(Exception):
    """Bad input that is the user's to fix: printed as one line, exit code 2."""


class DataError(ValueError):
    """Bad data (a file, a column, a shard, a vocabulary), stated in one line that names it.

    Console scripts print it as ``prog: error: <message>`` and exit with code 2, like a config error.
    """
