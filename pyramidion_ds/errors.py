"""The one exception the data pipeline raises for input a user can fix."""
from __future__ import annotations


class DataError(ValueError):
    """Bad data (a file, a column, a shard, a vocabulary), stated in one line that names it.

    Console scripts print it as ``prog: error: <message>`` and exit with code 2, like a config error.
    """
