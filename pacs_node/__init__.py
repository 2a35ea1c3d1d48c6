"""DICOM networking side of lungsys: Storage/Verification SCP, STOW-RS receiver, series
assembly, the job worker and its supervisor, delivery to PACS, and their wiring (the node).
Never imports :mod:`training` or the command line (:mod:`lungsys`)."""

#: The log line format of the ``lungsys`` command and of the node's worker process.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
