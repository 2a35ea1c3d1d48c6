"""Outbound: the node's sweeps that send results to PACS and events to webhooks.

Both read what is due from the job store (deliveries and notifications of this node's
series: it holds their files), try each once, and record the outcome; a failure is tried
again after a doubling backoff until ``[delivery] max_attempts``, then given up, logged at
ERROR with the command that sends it again, and (for a delivery) notified. Kept apart from
:mod:`pacs_node.node`, which wires the sweeps to the scheduler, so that the node's wiring
and the sending rules each read on their own.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from config import NodeConfig, NotificationEvent
from pacs_node import delivery, notify
from store.api import JobStore
from store.models import JobState, utcnow

log = logging.getLogger(__name__)


class Outbound:
    """The delivery and notification sweeps of one node (``config.node_id``)."""

    def __init__(self, store: JobStore, config: NodeConfig) -> None:
        self.store = store
        self.config = config
        self.node_id = config.node_id

    def delivery_sweep(self) -> None:
        """Send the due deliveries (after queueing the notices of jobs that lungsys worker
        processes finished); a failure is retried with backoff, or given up and notified."""
        destinations = {d.name: d for d in self.config.destinations}
        cfg = self.config.delivery
        for job_id, state in self.store.route_outcomes(       # from lungsys worker processes
                self.node_id, [(d.name, d.kind) for d in self.config.destinations]):
            notify.queue(self.store, self.config, job_id, NotificationEvent.job_done
                         if state == JobState.done else NotificationEvent.job_failed)
        for d in self.store.due_deliveries(node=self.node_id):
            dest = destinations.get(d.destination)
            if dest is None:
                self.store.record_attempt(d.id, ok=False, give_up=True,
                                          error=f"destination {d.destination!r} is no longer "
                                                f"configured")
                continue
            files = [Path(p) for p in self.store.result_paths(d.job_id)]
            try:
                delivery.send(dest, files, self.config.node.ae_title)
            except Exception as exc:
                attempts = d.attempts + 1
                give_up, retry_at = self._after_failure(attempts)
                give_up = give_up or getattr(exc, "permanent", False)
                self.store.record_attempt(d.id, ok=False, error=str(exc)[:2000],
                                          retry_at=retry_at, give_up=give_up)
                if give_up:
                    d.attempts, d.last_error = attempts, str(exc)[:2000]
                    notify.queue(self.store, self.config, d.job_id,
                                 NotificationEvent.delivery_failed, delivery=d)
                    log.error("delivery %d of job %d to %s given up after %d attempt(s): %s "
                              "(lungsys deliveries retry %d sends it again)", d.id, d.job_id,
                              dest.name, attempts, exc, d.id)
                else:
                    log.warning("delivery %d of job %d to %s failed (attempt %d of %d, next in "
                                "%.0f s): %s", d.id, d.job_id, dest.name, attempts,
                                cfg.max_attempts, (retry_at - utcnow()).total_seconds(), exc)
                continue
            self.store.record_attempt(d.id, ok=True)
            log.info("delivery %d of job %d to %s done (%d objects)", d.id, d.job_id, dest.name,
                     len(files))

    def _after_failure(self, attempts: int) -> tuple[bool, dt.datetime]:
        """After ``attempts`` failed tries of a delivery or a notification: whether to give
        up (``[delivery] max_attempts``), and when to try again (doubling backoff)."""
        cfg = self.config.delivery
        return attempts >= cfg.max_attempts, utcnow() + delivery.backoff(
            attempts, cfg.initial_backoff_seconds, cfg.max_backoff_seconds)

    def notification_sweep(self) -> None:
        """POST the due webhook notifications; retried as deliveries are."""
        targets = {t.name: t for t in self.config.notifications}
        for n in self.store.due_notifications(node=self.node_id):
            target = targets.get(n.target)
            if target is None:
                self.store.record_notice_attempt(n.id, ok=False, give_up=True,
                                                 error=f"notification target {n.target!r} is "
                                                       f"no longer configured")
                continue
            try:
                status = notify.post(target, n.payload)
            except notify.NotifyError as exc:
                attempts = n.attempts + 1
                give_up, retry_at = self._after_failure(attempts)
                self.store.record_notice_attempt(n.id, ok=False, status=exc.status,
                                                 error=str(exc)[:2000], retry_at=retry_at,
                                                 give_up=give_up)
                (log.error if give_up else log.warning)(
                    "notification %d (%s of job %d) to %s %s (attempt %d): %s", n.id, n.event,
                    n.job_id, n.target, "given up" if give_up else "failed", attempts, exc)
                continue
            self.store.record_notice_attempt(n.id, ok=True, status=status)
            log.info("notification %d (%s of job %d) to %s sent", n.id, n.event, n.job_id,
                     n.target)
