"""The retention sweep: old series whose results were delivered lose their files."""

from __future__ import annotations

import datetime as dt

from config import load_config
from pacs_node.node import Node
from store.api import ReceivedInstance
from store.models import Series, utcnow


def _node(tmp_path, days: int) -> Node:
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
                    f'[retention]\ndays = {days}\n')
    return Node(load_config(toml, environ={}))


def _received_and_done(node: Node, series_uid: str, delivered: bool) -> None:
    folder = node.data_dir / "incoming" / "1.2" / series_uid
    folder.mkdir(parents=True)
    (folder / "1.dcm").write_bytes(b"x")
    results = node.data_dir / "results" / "1.2" / series_uid / "v1"
    results.mkdir(parents=True)
    (results / "SR-lungsys-report.dcm").write_bytes(b"y")
    store = node.store
    store.record_instance(ReceivedInstance(f"{series_uid}.1", "1.2.840.10008.5.1.4.1.1.2",
                                           series_uid, "1.2", "CT", str(folder / "1.dcm"), 1,
                                           "1.2.840.10008.1.2.1"))
    [series] = [s for s in store.complete_ready(0, now=utcnow() + dt.timedelta(seconds=1))]
    job = store.queue_job(series.id)
    store.claim_job()
    store.finish_job(job.id, diagnosis="Healthy", probabilities={}, infected_fraction=0.0,
                     timings={}, model_version="v", device_uid="2.25.1",
                     results=[{"kind": "sr", "sop_instance_uid": f"{series_uid}.9",
                               "sop_class_uid": "x", "series_instance_uid": "9",
                               "path": str(results / "SR-lungsys-report.dcm")}])
    store.create_deliveries(job.id, [("pacs", "dimse")])
    d = store.due_deliveries()[-1]
    store.record_attempt(d.id, ok=delivered, error="" if delivered else "refused")
    with store.session() as s, s.begin():          # make it old
        row = s.get(Series, series.id)
        row.last_received = utcnow() - dt.timedelta(days=40)


def test_delivered_old_series_are_removed_and_others_kept(tmp_path):
    node = _node(tmp_path, days=30)
    _received_and_done(node, "1.2.10", delivered=True)
    _received_and_done(node, "1.2.20", delivered=False)     # still owed to PACS: kept
    node.retention_sweep()
    assert not (node.data_dir / "incoming" / "1.2" / "1.2.10").exists()
    assert not (node.data_dir / "results" / "1.2" / "1.2.10").exists()
    assert (node.data_dir / "incoming" / "1.2" / "1.2.20" / "1.dcm").exists()
    purged = {s.series_instance_uid: s.purged for s in node.store.series()}
    assert purged == {"1.2.10": True, "1.2.20": False}
    assert node.store.jobs()[-1].state.value == "done"     # the history stays
    node.retention_sweep()                                   # idempotent
