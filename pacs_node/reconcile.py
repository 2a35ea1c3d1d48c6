"""At start-up, files and job-store rows are made to agree again.

An instance is recorded and moved into place in one transaction
(:mod:`pacs_node.storage`), but a crash between the rename and the commit
leaves a file without a row, and an admin (or a failing disk) can remove a
file whose row remains. Before the node receives anything, under the data
folder's lock:

- a file in ``incoming/`` without a row is read: if it is where its UIDs
  say (the layout's path), it is recorded (an incident ``recovered``: it was
  never acknowledged, but nothing received is thrown away); otherwise, or
  when it cannot be read, it moves to ``quarantine/`` (an incident
  ``quarantined``);
- a row whose file is gone is removed, so that the instance can be sent
  again, and reported (an incident ``lost``, and a warning in the log).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from pacs_node.header import read_file_header
from pacs_node.layout import DataLayout, UIDRefused
from store.api import JobStore, ReceivedInstance, Recorded, StoreUnavailable
from store.models import IncidentKind

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    """How many files the start-up reconciliation recorded, quarantined and found lost."""

    recovered: int = 0
    quarantined: int = 0
    lost: int = 0


def reconcile(layout: DataLayout, store: JobStore, node: str) -> Reconciled:
    done = Reconciled()
    root = str(layout.root)
    recorded = {}
    for path, id_ in store.recorded_paths(node).items():
        # rows written by this version hold the layout's resolved paths; others may not
        key = path if path.startswith(root + os.sep) else os.path.realpath(path)
        recorded[key] = (path, id_)
    seen: set[str] = set()
    if layout.incoming.is_dir():
        for study in layout.incoming.iterdir():
            if study == layout.partial or not study.is_dir() or study.is_symlink():
                continue
            for path in study.glob("*/*"):
                if path.parent.is_symlink():
                    continue
                key = str(path)
                if key in recorded:
                    seen.add(key)
                elif path.is_file() and not path.is_symlink():
                    _orphan(layout, store, node, path, done)
    lost = [id_ for key, (path, id_) in recorded.items()
            if key not in seen and not os.path.exists(path)]
    if lost:
        done.lost = len(store.forget_lost(lost, node))
        log.warning("%d recorded instance(s) had no file any more: their rows are removed "
                    "(see `lungsys incidents`); the senders may send them again", done.lost)
    if done.recovered or done.quarantined:
        log.warning("%d unrecorded instance file(s) found and recorded, %d quarantined",
                    done.recovered, done.quarantined)
    return done


def _orphan(layout: DataLayout, store: JobStore, node: str, path, done: Reconciled) -> None:
    why = ""
    try:
        header = read_file_header(path)
        expected = layout.instance_path(header.study_instance_uid,
                                        header.series_instance_uid, header.sop_instance_uid)
        if expected != path:
            why = "its UIDs say it belongs elsewhere"
        else:
            recorded = store.record_instance(ReceivedInstance(
                sop_instance_uid=header.sop_instance_uid, sop_class_uid=header.sop_class_uid,
                series_instance_uid=header.series_instance_uid,
                study_instance_uid=header.study_instance_uid, modality=header.modality,
                path=str(path), size=path.stat().st_size,
                transfer_syntax_uid=header.transfer_syntax_uid, calling_aet="recovered",
                images_in_acquisition=header.images_in_acquisition, node=node))
            if recorded is not Recorded.new and store.instance_path_of(
                    header.sop_instance_uid) == str(path):
                return                         # its row was there all along
            if recorded is Recorded.new:
                store.record_incident(IncidentKind.recovered,
                                      f"{path} was on disk but not recorded (a crash before "
                                      f"its acknowledgement); now recorded", node=node,
                                      series_instance_uid=header.series_instance_uid,
                                      sop_instance_uid=header.sop_instance_uid)
                done.recovered += 1
                return
            why = f"its SOP Instance UID is recorded already ({recorded.value})"
    except UIDRefused as exc:
        why = str(exc)
    except (StoreUnavailable, SQLAlchemyError):
        raise                                  # the job store's trouble, not the file's
    except Exception as exc:
        why = f"it cannot be read ({type(exc).__name__})"
    try:
        target = layout.quarantine_file(path)
    except (OSError, ValueError) as exc:
        log.error("%s could not be quarantined: %s", path, exc)
        return
    store.record_incident(IncidentKind.quarantined, f"{path} moved to {target}: {why}",
                          node=node)
    done.quarantined += 1
