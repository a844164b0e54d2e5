"""Log lines and progress bars share the launcher's stderr: a log line never lands on a bar's line."""

import io
import logging
import sys

from tqdm import tqdm

from pyramidion_ds.logs import setup_logging


def test_log_lines_are_printed_above_an_open_progress_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging(0)
    log = logging.getLogger("pyramidion_ds.test")
    bar = tqdm(total=3, desc="train", file=stream, mininterval=0, ascii=True)
    for i in range(3):
        bar.update(1)
        log.info(f"update {i} done")
    bar.close()
    monkeypatch.undo()
    setup_logging(0)  # back to a handler on the real stderr for the tests that follow
    lines = stream.getvalue().replace("\r", "\n").split("\n")
    messages = [line for line in lines if "update " in line and " done" in line]
    assert len(messages) == 3
    for line in messages:  # each message starts its own line: no bar text before it
        assert line.split(" | ")[-1].startswith("update ") and "train:" not in line and "%|" not in line, line
