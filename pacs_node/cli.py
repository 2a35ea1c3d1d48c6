"""The ``lungsys`` command.

Exit status: 0 on success, 1 when the input is bad or an operation failed
(one line on stderr, no traceback), 2 on a usage error.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
    TimeElapsedColumn

from inference.version import software_version
from pacs_node import LOG_FORMAT

app = typer.Typer(
    name="lungsys",
    help=("lungsys: an AI node for chest CT. It receives CT series over DICOM, runs the M3 "
          "Lung-Sys model (Healthy / COVID-19 / H1N1 / CAP, with lesion maps) and sends a "
          "Structured Report and heatmaps back to PACS.\n\n"
          "Start with 'lungsys phantom --out demo/study --label covid --seed 7' to make a "
          "synthetic study, and 'lungsys scan demo/study' to see how the node reads it."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)  # no wrapping in pipes


class CLIError(Exception):
    """A failure to report as one line and exit status 1."""


def _version_callback(value: bool) -> None:
    if value:
        print(f"lungsys {software_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version_: Annotated[bool, typer.Option("--version", callback=_version_callback,
                                           is_eager=True, help="Print the version and exit.")]
    = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="More log output (-v info, -vv debug).")] = 0,
) -> None:
    level = logging.WARNING if verbose == 0 else (logging.INFO if verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format=LOG_FORMAT)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=err, transient=True,
                    disable=not err.is_terminal)


# the commands register themselves on the app
from pacs_node import cli_data, cli_model, cli_node  # noqa: E402,F401


def main() -> None:
    """Entry point: run the app, turning expected failures into one line.

    Every "bad input" error of the project (series, checkpoint, weights,
    manifest and configuration errors) is a ValueError; file-system failures
    are OSErrors.
    """
    try:
        app()
    except (CLIError, ValueError, OSError) as exc:
        err.print(f"lungsys: error: {exc}", markup=False, highlight=False)
        sys.exit(1)

