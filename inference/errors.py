"""Typed, one-line errors for series that cannot be analysed.

Every error here is a :class:`SeriesError`, itself a :class:`ValueError`, so
callers (the CLI, the node's filter) can report ``str(exc)`` as the reason
without a traceback.
"""


class SeriesError(ValueError):
    """A set of files cannot be turned into one analysable CT volume."""


class NoCTSeriesError(SeriesError):
    """No file in the input belongs to a CT image series."""


class MultipleSeriesError(SeriesError):
    """More than one CT series was found where exactly one was asked for."""

    def __init__(self, message: str, series_uids: list[str]) -> None:
        super().__init__(message)
        self.series_uids = series_uids


class InconsistentGeometryError(SeriesError):
    """Slices disagree on rows/columns, orientation or pixel spacing."""


class MissingPositionError(SeriesError):
    """A slice has no Image Position (Patient) or Image Orientation (Patient)."""


class DuplicatePositionError(SeriesError):
    """Two different slices sit at the same position along the slice normal."""
