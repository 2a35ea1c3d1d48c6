"""DICOM networking side of lungsys: Storage/Verification SCP, series
assembly, delivery to PACS, scheduler wiring and the ``lungsys`` CLI."""

#: The log line format of the ``lungsys`` command and of the node's worker process.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
