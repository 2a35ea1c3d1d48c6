""""Stored" means recorded: a job store that fails or vanishes never gets a Success, files
and rows agree again at start-up, and hostile UIDs never turn into paths outside the data
folder, for the receiver or for retention."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import time

import pydicom
import pytest

from config import load_config
from pacs_node.layout import DataLayout
from pacs_node.node import Node
from pacs_node.receiver import Receiver
from pacs_node.reconcile import reconcile
from pacs_node.storage import DUPLICATE_SOP_INSTANCE, InstanceStorage
from store.api import JobStore, ReceivedInstance, StoreUnavailable
from store.models import Series, SeriesState, utcnow

from conftest import require_tool, with_uids

ENV = {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, files) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("storescu"), "-v", "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, env=ENV, timeout=120)


@pytest.fixture
def receiver(tmp_path):
    store = JobStore(f"sqlite:///{tmp_path}/db/lungsys.db")
    node = Receiver(store, tmp_path / "data", min_free_disk_mb=1)
    node.start("127.0.0.1", 0)
    yield node, store
    node.stop()


def _files(folder):
    return sorted(p for p in folder.rglob("*.dcm"))


def test_a_job_store_removed_under_the_node_gets_no_success(receiver, study_factory, tmp_path):
    node, store = receiver
    files = study_factory("covid", 1, 24).files
    assert storescu(node.port, files[:2]).returncode == 0
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / "db" / f"lungsys.db{suffix}").unlink(missing_ok=True)
    proc = storescu(node.port, files[2:6])
    assert "Received Store Response (Success)" not in proc.stderr
    assert "Refused: OutOfResources" in proc.stderr    # storescu stops at the first
    assert len(_files(node.storage.incoming)) == 2        # nothing unrecorded stays on disk


def test_a_locked_job_store_gets_out_of_resources_then_recovers(receiver, study_factory,
                                                                tmp_path, monkeypatch):
    node, store = receiver
    files = study_factory("covid", 1, 24).files
    blocker = sqlite3.connect(tmp_path / "db" / "lungsys.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")                      # an admin's tool holds it
    try:
        proc = storescu(node.port, files[:1])               # waits the busy timeout, then
        assert "Refused: OutOfResources" in proc.stderr     # ... refuses: never Success
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _files(node.storage.incoming) == []
    assert store.counts()["instances"] == 0
    proc = storescu(node.port, files[:1])                   # sent again: stored now
    assert "Success" in proc.stderr and store.counts()["instances"] == 1


def test_a_sop_instance_uid_in_another_series_is_refused_and_recorded(receiver, study_factory,
                                                                      tmp_path):
    node, store = receiver
    source = study_factory("covid", 1, 24).files[0]
    assert storescu(node.port, [source]).returncode == 0
    ds = pydicom.dcmread(source)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()      # same SOP Instance UID, elsewhere
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    storage = InstanceStorage(store, node.storage.layout.root, min_free_disk_mb=1)
    tmp = storage.temp_file()
    tmp.write_bytes(other.read_bytes())
    outcome = storage.store_file(tmp, "CT2")
    assert outcome.status == DUPLICATE_SOP_INSTANCE == 0x0111
    [incident] = store.incidents("duplicate")
    assert incident.sop_instance_uid == ds.SOPInstanceUID and incident.origin == "CT2"
    assert storescu(node.port, [source]).returncode == 0   # the same again: stored already
    assert len(_files(node.storage.incoming)) == 1 and store.counts()["instances"] == 1


def test_start_up_records_orphan_files_quarantines_strays_and_reports_lost_rows(
        receiver, study_factory):
    node, store = receiver
    files = study_factory("covid", 1, 24).files
    assert storescu(node.port, files[:3]).returncode == 0
    layout = node.storage.layout
    lost = _files(layout.incoming)[0]
    lost.unlink()                                           # an admin's mistake
    ds = pydicom.dcmread(files[3])                          # a crash between rename and commit
    orphan = layout.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    orphan.write_bytes(files[3].read_bytes())
    stray = orphan.with_name("not-where-its-uids-say.dcm")
    stray.write_bytes(files[4].read_bytes())
    done = reconcile(layout, store, "")
    assert (done.recovered, done.quarantined, done.lost) == (1, 1, 1)
    paths = {p for s in store.series() for p in store.instance_paths(s.id)}
    assert str(orphan) in paths and str(lost) not in paths
    assert not stray.exists() and list(layout.quarantine.rglob("*.dcm"))
    assert {i.kind.value for i in store.incidents()} == {"recovered", "quarantined", "lost"}
    [series] = store.series()
    assert series.instance_count == 3                       # 3 sent - 1 lost + 1 recovered
    assert storescu(node.port, [files[0]]).returncode == 0  # the lost one can come again


def test_retention_of_hostile_series_deletes_nothing_outside_their_folders(tmp_path,
                                                                          study_factory):
    source = study_factory("covid", 1, 24).files[0]
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
                    f'[retention]\ndays = 1\n[dicomweb]\nport = 0\n')
    node = Node(load_config(toml, environ={}))
    storage = node.receiver.storage
    keep = [tmp_path / "precious.txt", tmp_path / "var" / "incoming" / "keep.txt"]
    for f in keep:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    sent = tmp_path / "sent"
    sent.mkdir()
    hostile = [with_uids(source, sent, study, series, sop) for study, series, sop in [
        (".", ".", "1.2.3"), ("..", "..", "1.2.4"), ("/var", "/tmp", "1.2.5"),
        ("1.2", "1.2/3", "1.2.6"), ("1.2", "1.2_3", "1.2.7")]]
    node.receiver.start("127.0.0.1", 0)                     # a modality sends them
    try:
        proc = storescu(node.port, hostile)
    finally:
        node.receiver.stop()
    assert proc.stderr.count("Received Store Response (Success)") == 5, proc.stderr
    stored = _files(storage.incoming)
    assert len(stored) == 5 and all(DataLayout(tmp_path / "var").inside(p) for p in stored)
    assert len({p.parent for p in stored}) == 5             # 1.2/3 and 1.2_3 apart
    with node.store.session() as s, s.begin():              # all done, long ago
        for row in s.query(Series):
            row.state, row.last_received = SeriesState.skipped, utcnow() - dt.timedelta(days=9)
    node.retention_sweep()
    assert _files(storage.incoming) == []
    assert all(f.exists() for f in keep) and (tmp_path / "var" / "db").exists()


def test_a_failed_write_while_receiving_is_out_of_resources(receiver, study_factory, tmp_path):
    node, store = receiver
    node.scp.temp_file = lambda: tmp_path / "no-such-folder" / "x.tmp"   # the disk fails
    proc = storescu(node.port, study_factory("covid", 1, 24).files[:1])
    assert "Refused: OutOfResources" in proc.stderr and "Success" not in proc.stderr
    assert store.counts()["instances"] == 0


def test_retention_never_removes_what_arrived_after_it_looked(tmp_path, study_factory):
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
                    f'[retention]\ndays = 1\n[dicomweb]\nport = 0\n')
    node = Node(load_config(toml, environ={}))
    files = study_factory("covid", 1, 24).files
    node.receiver.start("127.0.0.1", 0)
    try:
        assert storescu(node.port, files[:2]).returncode == 0
        with node.store.session() as s, s.begin():          # finished, long ago
            for row in s.query(Series):
                row.state, row.last_received = SeriesState.done, utcnow() - dt.timedelta(days=9)
        cutoff = utcnow() - dt.timedelta(days=1)
        [expired] = node.store.expired_series(cutoff, node.node_id)
        assert storescu(node.port, files[2:3]).returncode == 0   # arrives meanwhile
        assert not node.store.forget_series(expired.id, cutoff)  # so nothing is forgotten
        node.retention_sweep()
        assert len(_files(node.receiver.storage.incoming)) == 3
        with node.store.session() as s, s.begin():          # now it is old and finished
            for row in s.query(Series):
                row.state, row.last_received = SeriesState.done, utcnow() - dt.timedelta(days=9)
        node.retention_sweep()
        assert _files(node.receiver.storage.incoming) == []
        assert storescu(node.port, files[:2]).returncode == 0    # the study sent again
    finally:
        node.receiver.stop()
    [series] = node.store.series()
    assert not series.purged and series.instance_count == 5
    done = reconcile(node.layout, node.store, node.node_id)   # a restart finds all in order
    assert (done.recovered, done.quarantined, done.lost) == (0, 0, 0)


def test_the_node_keeps_its_name_when_its_host_is_renamed(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\n')
    config = load_config(toml, environ={})
    first = config.node_id
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "node-id").write_text("old-host:0123456789ab\n")
    assert load_config(toml, environ={}).node_id == "old-host:0123456789ab" != first


def test_a_postgresql_job_store_that_goes_down_gets_no_success(tmp_path, study_factory):
    from postgres import Postgres, _binary

    server = Postgres().start()
    try:
        store = JobStore(server.new_database())
        node = Receiver(store, tmp_path / "data", min_free_disk_mb=1)
        node.start("127.0.0.1", 0)
        try:
            files = study_factory("covid", 1, 24).files
            assert "Success" in storescu(node.port, files[:1]).stderr
            server._run(_binary("pg_ctl"), "-D", str(server.data), "-m", "immediate", "-w",
                        "stop")                                  # the database server dies
            proc = storescu(node.port, files[1:2])
            assert "Refused: OutOfResources" in proc.stderr and "(Success)" not in proc.stderr
            assert len(_files(node.storage.incoming)) == 1       # nothing unrecorded kept
            server._run(_binary("pg_ctl"), "-D", str(server.data), "-l",
                        str(server.folder / "log"), "-w", "-o",
                        f"-h 127.0.0.1 -p {server.port} -k {server.folder} -F", "start")
            assert "Success" in storescu(node.port, files[1:2]).stderr   # back: stored
            assert store.counts()["instances"] == 2
        finally:
            node.stop()
    finally:
        server.stop()


def test_a_token_is_known_at_once_while_another_process_holds_the_store(tmp_path):
    """Its last use is written in a thread nothing waits for: with the lock held by another
    process, a request with a token once waited the 10 s busy timeout and then failed
    with 500 (STOW-RS, /metrics)."""
    from conftest import wait_for

    store = JobStore(f"sqlite:///{tmp_path}/db/lungsys.db")
    token = store.create_token("modality", "sender")
    other = sqlite3.connect(store.file, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")                      # a writer elsewhere holds the lock
    try:
        start = time.monotonic()
        principal = store.token_principal(token)
        assert principal is not None and principal.name == "modality"
        assert time.monotonic() - start < 2.0
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert wait_for(lambda: store.tokens()[0].last_used is not None, 15)


def test_a_sweep_says_once_that_the_store_is_away_and_goes_on(caplog):
    """While another process held the job store's lock, the sweeps logged a traceback
    every second; now one line a minute, and a fault of another kind is not hidden."""
    from sqlalchemy.exc import OperationalError

    from pacs_node.node import _store_may_be_away

    def locked() -> None:
        raise OperationalError("UPDATE series", {}, sqlite3.OperationalError(
            "database is locked"))

    sweep = _store_may_be_away("assembly", locked)
    for _ in range(5):
        sweep()
    [record] = caplog.records
    assert record.getMessage().startswith("the assembly sweep cannot use the job store now "
                                          "(database is locked)")
    assert record.exc_info is None

    def broken() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        _store_may_be_away("delivery", broken)()


def test_a_series_completed_while_the_store_failed_is_queued_once_it_recovers(
        tmp_path, monkeypatch):
    """The sweep completes a series in one transaction and queues its job in another: with
    the job store locked in between, the series stayed complete and no later sweep looked
    at it again (until another instance came)."""
    toml = tmp_path / "node.toml"
    toml.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nmin_free_disk_mb = 1\n'
                    f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
                    f'[assembly]\nstable_seconds = 0.001\nmin_slices = 1\n[dicomweb]\nport = 0\n')
    node = Node(load_config(toml, environ={}))
    node.store.record_instance(ReceivedInstance(
        sop_instance_uid="1.2.3.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid="1.2.3", study_instance_uid="1.2", modality="CT",
        path=str(tmp_path / "x.dcm"), size=1, transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="CT1", node=node.node_id))
    monkeypatch.setattr("pacs_node.node.header_filter", lambda paths, least: "")
    time.sleep(0.01)                                         # (quiet for stable_seconds)
    node.assembly_sweep()                                    # start-up: nothing stuck
    real = node.store.queue_job

    def locked(*args, **kw):
        raise StoreUnavailable("database is locked")

    monkeypatch.setattr(node.store, "queue_job", locked)
    node.store.record_instance(ReceivedInstance(
        sop_instance_uid="1.2.4.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_instance_uid="1.2.4", study_instance_uid="1.2", modality="CT",
        path=str(tmp_path / "y.dcm"), size=1, transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_aet="CT1", node=node.node_id))
    time.sleep(0.01)
    with pytest.raises(StoreUnavailable):
        node.assembly_sweep()
    assert {s.series_instance_uid: s.state for s in node.store.series()}["1.2.4"] == \
        SeriesState.complete
    monkeypatch.setattr(node.store, "queue_job", real)
    node.assembly_sweep()                                    # the store is back
    assert {s.series_instance_uid for s in node.store.series("queued")} == {"1.2.3", "1.2.4"}
