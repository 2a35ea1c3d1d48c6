"""DICOM networking side of lungsys: Storage/Verification SCP, STOW-RS receiver, series
assembly, the job worker and its supervisor, delivery to PACS, and their wiring (the node).
Never imports :mod:`training` or the command line (:mod:`lungsys`)."""

import logging

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


def configure_logging(level: int) -> None:
    """The node's log at ``level`` (INFO by default: what was received, analysed,
    delivered, given up), the libraries quieter (:data:`QUIET_LIBRARIES`)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    logging.getLogger().setLevel(level)
    for name, quiet in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(quiet if level > logging.DEBUG else logging.NOTSET)
