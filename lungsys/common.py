"""What every command group shares: the consoles, the one-line error, the progress bar,
how a time of the job store is printed.

Exit status of every command: 0 on success, 1 when the input is bad or an
operation failed (one line on stderr, no traceback), 2 on a usage error.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
    TimeElapsedColumn

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # no wrapping in pipes


class CLIError(Exception):
    """A failure to report as one line and exit status 1."""


def progress(transient: bool = True) -> Progress:
    """A progress bar on stderr, shown only at a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=transient,
                    disable=not err.is_terminal)


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
