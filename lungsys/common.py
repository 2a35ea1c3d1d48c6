"""What every command group shares: the consoles, the one-line error, the progress bar,
how a time of the job store is printed.

Exit status of every command: 0 on success, 1 when the input is bad or an
operation failed (one line on stderr, no traceback), 2 on a usage error.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from training.clock import duration

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # no wrapping in pipes


class CLIError(Exception):
    """A failure to report as one line and exit status 1."""


def progress(transient: bool = True) -> "Progress | LineProgress":
    """Progress on stderr: a bar at a terminal (with the time left), else a line now and
    then (:class:`LineProgress`): long work is never silent in a log."""
    if not err.is_terminal:
        return LineProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err,
                    transient=transient)


class LineProgress:
    """Progress where stderr is not a terminal (a log, a pipe, CI): a line for each task
    every ``EVERY`` seconds, and when a task that took longer ends, with what is done and
    the time left. Takes the calls of rich's Progress that lungsys makes."""

    EVERY = 10.0

    def __init__(self) -> None:
        self.console = err
        self._tasks: dict[int, dict] = {}
        self._next = 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0,
                 **_) -> int:
        self._next += 1
        now = time.monotonic()
        self._tasks[self._next] = {"description": description, "total": total,
                                   "completed": completed, "from": completed, "started": now,
                                   "said": now}
        return self._next

    def update(self, task_id: int, *, advance: float | None = None,
               completed: float | None = None, description: str | None = None,
               total: float | None = None, **_) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        if description is not None:
            task["description"] = description
        if total is not None:
            task["total"] = total
        task["completed"] = completed if completed is not None else \
            task["completed"] + (advance or 0)
        now = time.monotonic()
        finished = task["total"] is not None and task["completed"] >= task["total"]
        if now - task["said"] >= self.EVERY or (finished and task["said"] > task["started"]):
            task["said"] = now                  # (a short task ends without a line)
            self._say(task, now)
            if finished:
                task["total"] = None            # its end said once

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        self._tasks.pop(task_id, None)

    def _say(self, task: dict, now: float) -> None:
        elapsed = now - task["started"]
        done, total = task["completed"], task["total"]
        line = f"{task['description']}: {done:g}" + (f"/{total:g}" if total else "")
        line += f", {duration(elapsed)}"
        rate = (done - task["from"]) / elapsed if elapsed > 0 else 0
        if total and done < total and rate > 0:
            line += f", about {duration((total - done) / rate)} left"
        err.print(line, markup=False, highlight=False)


def print_fields(values: dict, prefix: str = "") -> None:
    """Nested values as ``key: value`` lines that read at 80 columns (``--json`` gives the
    same for scripts)."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            print_fields(value, f"{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                print_fields(item, f"{name}[{i}].")
        else:
            text = ", ".join(map(str, value)) if isinstance(value, list) else value
            out.print(f"{name}: {'-' if text in (None, '') else text}", markup=False,
                      highlight=False)


def when(value) -> str:
    """A time of the job store (UTC) with its time zone: 2026-11-29T09:17:18Z."""
    return value.isoformat(timespec="seconds") + "Z" if value is not None else ""
