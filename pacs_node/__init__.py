"""DICOM networking side of lungsys: Storage/Verification SCP, series
assembly, delivery to PACS, scheduler wiring and the ``lungsys`` CLI."""
