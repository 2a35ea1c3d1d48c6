"""The installed lungsys version, as results, checkpoints and the CLI report it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    try:
        return version("lungsys")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"
