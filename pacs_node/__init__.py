"""DICOM networking side of lungsys: Storage/Verification SCP, STOW-RS receiver, series
assembly, the job worker and its supervisor, delivery to PACS, and their wiring (the node).
Never imports :mod:`training` or the command line (:mod:`lungsys`)."""

import logging
from typing import Callable

#: The log line format of the ``lungsys`` command and of the node's worker process.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Libraries whose INFO lines are theirs, not the admin's: kept at these levels unless the
#: node logs at DEBUG. pynetdicom's transport logs two ERROR lines for a peer that is not
#: there; the delivery's one WARNING line says it (with the reason) instead.
QUIET_LIBRARIES = {"pynetdicom": logging.WARNING, "apscheduler": logging.WARNING,
                   "urllib3": logging.WARNING, "PIL": logging.WARNING,
                   "highdicom": logging.WARNING, "sqlalchemy": logging.WARNING,
                   "uvicorn": logging.ERROR,        # its warnings: the node's own lines
                   "dicomweb_client": logging.WARNING,
                   "pynetdicom.transport": logging.CRITICAL}


#: Control characters (C0, DEL, C1) as a log line shows them: escaped.
_ESCAPED = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


class OneLineFormatter(logging.Formatter):
    """:data:`LOG_FORMAT`, each message on one line whatever a sender put into a value it
    names (a URL's path, an AE title, a user name): control characters are escaped, so
    that no request can forge a line of the log (``%0A`` in a path) or drive the
    terminal that shows it. A traceback keeps its lines, each behind ``| `` and escaped
    the same way: its exception's text may quote a sender (a value pydicom could not
    read), and none of its lines can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPED)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _framed(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _framed(stack_info)


def _framed(text: str) -> str:
    return "\n".join("| " + line.translate(_ESCAPED) for line in text.split("\n"))


def one_line(exc: BaseException, scrub: Callable[[str], str] | None = None) -> str:
    """What an exception says, for a log line or a row's error: its first line, at most
    200 characters (a driver's message runs on with its SQL and parameters; a library's
    may be empty: then its type). ``scrub`` (credentials out of URLs, say) is applied
    before the cut, which could otherwise leave half a secret it no longer matches."""
    text = str(exc)
    lines = (scrub(text) if scrub else text).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def log_to_stderr(level: int) -> None:
    """The root logger writes one-line records (:class:`OneLineFormatter`) to stderr, at
    ``level`` (the first call installs the handler; later ones set the level)."""
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter())
    logging.basicConfig(level=level, handlers=[handler])


def _not_uvicorns_fault_record(record: logging.LogRecord) -> bool:
    """uvicorn's "Exception in ASGI application", its traceback at ERROR: the node's own
    line has named the fault (pacs_node.web.app; the traceback at DEBUG)."""
    return record.msg != "Exception in ASGI application\n" or record.levelno < logging.ERROR


def configure_logging(level: int) -> None:
    """The node's log at ``level`` (INFO by default: what was received, analysed,
    delivered, given up), the libraries quieter (:data:`QUIET_LIBRARIES`)."""
    log_to_stderr(level)
    logging.getLogger().setLevel(level)
    for name, quiet in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(quiet if level > logging.DEBUG else logging.NOTSET)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if level > logging.DEBUG and _not_uvicorns_fault_record not in uvicorn_errors.filters:
        uvicorn_errors.addFilter(_not_uvicorns_fault_record)
