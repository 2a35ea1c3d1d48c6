"""What every command group shares: the consoles, the one-line error, the progress bar.

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
