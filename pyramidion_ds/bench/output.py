"""A benchmark's JSON file that parses at every moment: rewritten whole, atomically, after every row.

A run cut short (a time limit, a crash, an out-of-memory kill) leaves the rows measured so far, and a stray
line on stdout (a library's fallback message, a logger) cannot corrupt the file, because the file is never
stdout: ``--output FILE`` writes it, stdout goes to a log.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional


def write_json(path, report: dict) -> None:
    """Write ``report`` to ``path`` through a temporary file in the same folder and a rename: a reader sees
    the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ReportFile:
    """The report of one benchmark run, written to ``path`` (None: not written) after every row.

    ``report`` is the run's header; rows go to ``report[rows_key]``. The file exists from the start (with
    no rows and ``"complete": false``), so even a run killed before its first row leaves valid JSON, and
    :meth:`finish` marks the run complete.
    """

    def __init__(self, path: Optional[str], report: dict, rows_key: str = "rows"):
        self.path, self.report, self.rows_key = path, report, rows_key
        self.report.setdefault(rows_key, [])
        self.report["complete"] = False
        self.flush()

    @property
    def rows(self) -> list:
        return self.report[self.rows_key]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.flush()

    def flush(self) -> None:
        if self.path:
            write_json(self.path, self.report)

    def finish(self) -> dict:
        self.report["complete"] = True
        self.flush()
        return self.report
