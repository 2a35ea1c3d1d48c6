"""The ``lungsys`` command, built from its groups (data, model, train, node).

The group modules import only :mod:`lungsys.common` and the packages of the
design; this module imports the groups and registers their commands, so the
arrows run one way. Exit status: 0 on success, 1 when the input is bad or an
operation failed (one line on stderr, no traceback), 2 on a usage error.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from inference.version import software_version
from lungsys import accounts, data, model, node, rules, train
from lungsys.common import CLIError, err
from pacs_node import log_to_stderr

app = typer.Typer(
    name="lungsys",
    help=("lungsys: an AI node for chest CT. It receives CT series over DICOM, runs the M3 "
          "Lung-Sys model (Healthy / COVID-19 / H1N1 / CAP, with lesion maps; or another "
          "architecture of the founding papers: Hu 2020, LA-DNN, dual sampling) and sends a "
          "Structured Report and heatmaps back to PACS.\n\n"
          "Start with 'lungsys phantom --out demo/study --label covid --seed 7' to make a "
          "synthetic study, and 'lungsys scan demo/study' to see how the node reads it."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,     # plain help, as DCMTK and Orthanc print it: whole option names
    context_settings={"help_option_names": ["-h", "--help"]},
)


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
    log_to_stderr(level)


# Top-level commands first, then the groups, in the order `lungsys --help` lists them.
for _name, _command in (*data.COMMANDS, *train.COMMANDS, *model.COMMANDS, *node.COMMANDS):
    app.command(_name)(_command)
for _name, _group in (*model.GROUPS, *train.GROUPS, *node.GROUPS, *accounts.GROUPS,
                      *rules.GROUPS):
    app.add_typer(_group, name=_name)


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

