"""A job's own log: what the worker logs while it runs the job, kept in the job store.

The console shows it on the job's page, so that an admin reads why a job took
long or failed without searching the node's log for its lines.
"""

from __future__ import annotations

import logging
import threading

from pacs_node import OneLineFormatter


class JobLog(logging.Handler):
    """What the worker's thread logs while it runs one job (INFO and above, as far as the
    node logs them: ``lungsys serve`` logs INFO): the job's analysis log in the job store,
    shown on its console page. Like the node's log, it never holds patient data (that
    is only logged at DEBUG)."""

    MAX_LINES = 200

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.thread = threading.get_ident()
        self.lines: list[str] = []
        self.setFormatter(OneLineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and len(self.lines) < self.MAX_LINES:
            self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)

    def __enter__(self) -> "JobLog":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
