"""Model-side of lungsys: CT series loading, preprocessing, the M3 Lung-Sys
networks, localisation and result objects. Never imports :mod:`pacs_node`."""

# pydicom checks every value it reads and logs the offending ones at WARNING
# (and warns on stderr): a birth date written 1961-07-04 would reach the node's
# log. Values are checked where they are used instead (inference.conformance,
# inference.series), and never logged.
from pydicom import config as _pydicom_config  # noqa: E402

_pydicom_config.settings.reading_validation_mode = _pydicom_config.IGNORE
