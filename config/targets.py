"""Where the node sends things: ``[[destinations]]`` (results, over DIMSE or STOW-RS) and
``[[notifications]]`` (webhooks for job and delivery events)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from config.values import PORT, ConfigError, build_section, check_table


class DestinationKind(enum.StrEnum):
    """How results reach a destination."""

    dimse = "dimse"          # C-STORE (DICOM TLS optional)
    dicomweb = "dicomweb"    # STOW-RS


@dataclass(frozen=True)
class Destination:
    """``[[destinations]]``: where results are sent."""

    name: str
    kind: DestinationKind
    ae_title: str = ""
    host: str = ""
    port: int = field(default=0, metadata=PORT)
    url: str = ""
    tls: bool = False
    ca_certificates: str = ""
    certificate: str = ""
    private_key: str = ""


class NotificationEvent(enum.StrEnum):
    """What a webhook can be told of."""

    job_done = "job_done"                # a series analysed: diagnosis, probabilities
    job_failed = "job_failed"            # an analysis that failed (skipped series are not)
    delivery_failed = "delivery_failed"  # a delivery given up after its attempts


@dataclass(frozen=True)
class Notification:
    """``[[notifications]]``: a webhook: JSON POSTed for each event it asks for, retried
    as deliveries are (``[delivery]`` backoff and attempts)."""

    name: str
    url: str
    events: tuple[NotificationEvent, ...] = tuple(NotificationEvent)
    include_uids: bool = False        # the Study and Series Instance UIDs in the payload
    secret: str = ""                  # signs the body: X-Lungsys-Signature, HMAC-SHA256 hex
    console_url: str = ""             # the console's address, for a link to the job


def destination(where: str, i: int, raw: Any) -> Destination:
    check_table(where, raw, Destination)
    values = {**raw, "name": raw.get("name") or f"destination-{i + 1}"}
    if "kind" not in raw:
        raise ConfigError(f"{where}.kind: expected one of {', '.join(DestinationKind)}")
    dest = build_section(Destination, values, where, {})
    needed = (("ae_title", "host", "port") if dest.kind == DestinationKind.dimse else ("url",))
    for key in needed:
        if not raw.get(key):
            raise ConfigError(f"{where}.{key}: required for a {dest.kind} destination")
    for key in ("ca_certificates", "certificate", "private_key"):
        value = getattr(dest, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"{where}.{key}: no such file {value}")
    return dest


def notification(where: str, i: int, raw: Any) -> Notification:
    check_table(where, raw, Notification)
    target = build_section(Notification, {**raw, "name": raw.get("name") or
                                          f"notification-{i + 1}"}, where, {})
    parts = urlsplit(target.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url: an http:// or https:// URL, got {target.url!r}")
    return target
