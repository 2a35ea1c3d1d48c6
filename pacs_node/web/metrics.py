"""Prometheus metrics of one node (``GET /metrics``), with ``prometheus_client``.

Two kinds, in one registry per node (so that two nodes in one process, as in
the tests, do not mix):

- counted as it happens, since the node started: instances offered, by
  protocol (``dimse``, ``stow``) and DICOM status (``0x0000`` stored, ...);
- read at each scrape (a collector): associations active, HTTP connections
  open, series and jobs by state from the job store, the queue depth, delivery
  attempts and failures by destination, the analysis seconds of the jobs done
  (a histogram), free disk against the configured minimum, and the model
  (version, profile, device).

No label carries a patient, a study or a UID.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily, InfoMetricFamily)

from config import DestinationKind

if TYPE_CHECKING:
    from pacs_node.node import Node

#: Histogram buckets of the analysis seconds of a job.
SECONDS_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1800)
STOW_ORIGIN = "STOW-RS"


class NodeMetrics:
    """The registry of one node: counters fed by its storage, a collector reading it."""

    def __init__(self, node: "Node") -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.received = Counter(
            "lungsys_instances_received", "Instances offered to the node, by protocol and "
            "DICOM status (0x0000: stored)", ["protocol", "status"], registry=self.registry)
        self.registry.register(_Collector(node))

    def count(self, origin: str, status: int) -> None:
        """One instance offered (InstanceStorage's ``on_outcome``)."""
        protocol = "stow" if origin == STOW_ORIGIN else DestinationKind.dimse.value
        self.received.labels(protocol, f"0x{int(status):04X}").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Collector:
    """What the node and its job store say at the moment of a scrape."""

    def __init__(self, node: "Node") -> None:
        self.node = node

    def describe(self):
        return []

    def collect(self):
        node = self.node
        yield GaugeMetricFamily("lungsys_associations_active", "DICOM associations open now",
                                value=node.receiver.scp.associations)
        yield GaugeMetricFamily("lungsys_http_connections_open", "HTTP connections open now",
                                value=node.http_gate.open if node.http_gate else 0)
        tallies = node.store.tallies()
        series = GaugeMetricFamily("lungsys_series", "Series in the job store, by state",
                                   labels=["state"])
        for state, n in sorted(tallies["series"].items()):
            series.add_metric([state], n)
        yield series
        jobs = GaugeMetricFamily("lungsys_jobs", "Jobs in the job store, by state",
                                 labels=["state"])
        for state, n in sorted(tallies["jobs"].items()):
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("lungsys_queue_depth", "Jobs waiting for a worker",
                                value=tallies["jobs"].get("queued", 0))
        attempts = CounterMetricFamily("lungsys_delivery_attempts",
                                       "Delivery attempts in the job store, by destination "
                                       "and outcome", labels=["destination", "outcome"])
        for destination, ok, n in sorted(tallies["attempts"]):
            attempts.add_metric([destination, "ok" if ok else "failed"], n)
        yield attempts
        seconds = sorted(tallies["job_seconds"])
        buckets = [(str(b), sum(1 for s in seconds if s <= b)) for b in SECONDS_BUCKETS]
        yield HistogramMetricFamily("lungsys_inference_seconds",
                                    "Seconds from a job's start to its results written",
                                    buckets=[*buckets, ("+Inf", len(seconds))],
                                    sum_value=sum(seconds))
        free = shutil.disk_usage(node.receiver.storage.incoming).free
        yield GaugeMetricFamily("lungsys_disk_free_bytes", "Free bytes where instances are "
                                "received", value=free)
        yield GaugeMetricFamily("lungsys_disk_minimum_bytes", "The configured free-disk "
                                "minimum ([node] min_free_disk_mb)",
                                value=node.receiver.storage.min_free)
        model = node.model
        if model is not None:
            info = InfoMetricFamily("lungsys_model", "The model the worker loaded")
            info.add_metric([], {"version": model.version, "profile": model.profile,
                                 "device": str(getattr(model, "device", "")) or "unknown"})
            yield info
