"""Webhooks: tell other systems (a chat channel, a RIS, an on-call pager) what happened.

For each ``[[notifications]]`` target that asks for an event (``job_done``,
``job_failed``, ``delivery_failed``), a JSON body is queued in the job store when
the event happens and POSTed by the node's sweep, retried with the delivery
backoff until it is answered 2xx or given up; every try is recorded (``lungsys
jobs show`` lists them). The body carries no patient data: the job, the node,
the diagnosis and probabilities, the model, the error; the Study and Series
Instance UIDs only with ``include_uids = true``; a link to the job when
``console_url`` is set. With a ``secret``, ``X-Lungsys-Signature`` is the
HMAC-SHA256 (hex) of the body, so a receiver can tell the node's posts from
others. Only the outcome and the status are logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import TYPE_CHECKING

import requests

from config import Notification, NotificationEvent
from pacs_node.delivery import redact
from inference.model_info import recorded_low_confidence
from inference.version import software_version

if TYPE_CHECKING:
    from store.models import Delivery, Job

log = logging.getLogger(__name__)

#: Seconds a receiver has to answer.
TIMEOUT_SECONDS = 10.0
SIGNATURE_HEADER = "X-Lungsys-Signature"


class NotifyError(Exception):
    """A webhook that did not take a notification; ``status`` is its HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def payload(event: NotificationEvent, job: "Job", node_id: str, target: Notification,
            delivery: "Delivery | None" = None) -> dict:
    """The JSON body of one event: no patient name, ID or birth date, ever."""
    body = {
        "event": str(event), "job": job.id, "node": node_id, "lungsys": software_version(),
        "state": job.state.value, "diagnosis": job.diagnosis or None,
        "probabilities": job.probabilities, "infected_fraction": job.infected_fraction,
        "model_version": job.model_version or None,
        "caution": job.caution or None,            # an untrained model's diagnosis
        "low_confidence": recorded_low_confidence(job.probabilities),
        "finished_at": job.finished_at.isoformat() + "Z" if job.finished_at else None,
        "error": job.error or None,
    }
    if delivery is not None:
        body["delivery"] = {"id": delivery.id, "destination": delivery.destination,
                            "attempts": delivery.attempts,
                            "error": redact(delivery.last_error)}
    if target.include_uids:
        body["study_instance_uid"] = job.series.study_instance_uid
        body["series_instance_uid"] = job.series.series_instance_uid
    if target.console_url:
        body["link"] = f"{target.console_url.rstrip('/')}/jobs/{job.id}"
    return body


def _reason(exc: BaseException) -> str:
    """The network's words for a failed request ("connection refused", "timed out"), found
    under the layers requests and urllib3 wrap it in."""
    seen, todo = set(), [exc]
    while todo:
        error = todo.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.strerror:
            return error.strerror.lower()
        if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
            return "timed out"
        todo += [error.__cause__, error.__context__, getattr(error, "reason", None),
                 *(a for a in error.args if isinstance(a, BaseException))]
    return type(exc).__name__


def queue(store, config, job_id: int, event: NotificationEvent,
          delivery: "Delivery | None" = None) -> None:
    """Queue ``event`` of a job for every target that asks for it (never raises: a
    notification that cannot be queued is logged, and the job's own outcome stands)."""
    targets = [t for t in config.notifications if event in t.events]
    if not targets:
        return
    try:
        job = store.job_for_notice(job_id)
        store.queue_notifications(job_id, str(event), [
            (t.name, payload(event, job, config.node_id, t, delivery)) for t in targets])
    except Exception as exc:
        log.error("job %d: %s notification not queued: %s", job_id, event, type(exc).__name__)


def post(target: Notification, body: dict, timeout: float = TIMEOUT_SECONDS) -> int:
    """POST ``body`` to the target; its HTTP status, or NotifyError."""
    data = json.dumps(body, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"lungsys/{software_version()}"}
    if target.secret:
        headers[SIGNATURE_HEADER] = hmac.new(target.secret.encode(), data,
                                             hashlib.sha256).hexdigest()
    try:
        response = requests.post(target.url, data=data, headers=headers, timeout=timeout,
                                 allow_redirects=False)
    except requests.RequestException as exc:
        raise NotifyError(f"POST to {target.name} failed: {_reason(exc)}") from None
    if not 200 <= response.status_code < 300:    # the URL is left out: webhook URLs
        raise NotifyError(f"POST to {target.name}: HTTP {response.status_code}",  # are secrets
                          status=response.status_code)
    return response.status_code
