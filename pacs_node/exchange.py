"""Where a worker reads a job's instances and leaves its results.

Two kinds (``[worker] instances``), one interface for :class:`pacs_node.worker.JobRunner`:

:class:`SharedFolder`
    the node's data folder, in the node's process or mounted at the same path
    on a worker's machine: instances are read where they were received,
    results written into ``results/STUDY/SERIES/vN/aK``.
:class:`OverHttp`
    a worker with a data folder of its own: a job's series is retrieved from
    the node over WADO-RS into ``work/job-J-aK/`` (streamed to disk, never
    held in memory whole), its results are written there, handed back to the
    node (:mod:`pacs_node.wado`), which files them in its results folder, and
    the work folder is removed. The worker records the outcome with the
    node's paths, so the node delivers them as its own worker's.

A hand-over that fails on the way (the node restarting, the network) raises
:class:`HandOverError`: the job goes back to the queue, its attempt counted,
rather than failing at once.
"""

from __future__ import annotations

import logging
import mmap
import shutil
import time
from pathlib import Path

import requests

from pacs_node.layout import DataLayout
from pacs_node.multipart import (CHUNK, StowError, boundary_of, media_type, multipart_files,
                                 split_parts, write_part)
from pacs_node.wado import CLAIM_HEADER
from store.jobs import LeaseLost
from store.models import Job

log = logging.getLogger(__name__)

_BOUNDARY = "lungsys-results-boundary"
#: Seconds to connect, and to wait for each piece of an answer.
TIMEOUTS = (10.0, 120.0)


class HandOverError(ConnectionError):
    """Instances or results could not cross between the node and a worker: one line why."""


class SharedFolder:
    """The node's own data folder (see the module)."""

    def __init__(self, store, layout: DataLayout) -> None:
        self.store = store
        self.layout = layout

    def instances(self, job: Job) -> list[str]:
        return self.store.instance_paths(job.series_id)

    def results_folder(self, job: Job) -> Path:
        series = job.series
        return self.layout.inside(self.layout.results_folder(
            series.study_instance_uid, series.series_instance_uid, job.version, job.attempts))

    def publish(self, job: Job, records: list[dict]) -> list[dict]:
        return records

    def discard(self, job: Job) -> None:
        """Results of a claim that was lost: removed."""
        shutil.rmtree(self.results_folder(job), ignore_errors=True)

    def finished(self, job: Job) -> None:
        pass


class NodeClient:
    """The node's HTTP service, as a worker of the worker role calls it."""

    def __init__(self, url: str, token: str, ca_certificates: str = "") -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.trust_env = False         # no proxy or CA bundle from the environment
        self.http.verify = ca_certificates or True
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kwargs) -> requests.Response:
        try:
            answer = self.http.request(method, self.url + path, timeout=TIMEOUTS, **kwargs)
        except requests.RequestException as exc:
            raise HandOverError(f"{method} {self.url}{path}: {type(exc).__name__}: "
                                f"{str(exc)[:200]}") from None
        if answer.status_code >= 400:
            try:
                why = answer.json().get("error", "")
            except (ValueError, AttributeError):
                why = answer.reason
            answer.close()
            if answer.status_code == 410:           # the claim is no longer this worker's
                raise LeaseLost(f"{path}: {str(why)[:200]}")
            raise HandOverError(f"{method} {self.url}{path}: HTTP {answer.status_code} "
                                f"{str(why)[:200]}")
        return answer

    def _json(self, answer: requests.Response, key: str):
        try:
            return answer.json()[key]
        except (ValueError, KeyError, TypeError):
            raise HandOverError(f"{answer.url}: an answer without {key!r}") from None

    def node_id(self) -> str:
        """The node's id in the job store (and a check of the token)."""
        return str(self._json(self._call("GET", "/worker/node"), "node"))[:64]

    def retrieve_series(self, study: str, series: str, folder: Path, key: str) -> list[Path]:
        """WADO-RS: the series' instances as files in ``folder`` (created)."""
        try:
            return self._retrieve(study, series, folder, key)
        except OSError as exc:                      # this worker's disk: the job runs again
            raise HandOverError(f"the series could not be written here: "
                                f"{exc.strerror or exc}") from None

    def _retrieve(self, study: str, series: str, folder: Path, key: str) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        spool = folder / ".retrieved"
        answer = self._call("GET", f"/dicom-web/studies/{study}/series/{series}", stream=True,
                            headers={"Accept": 'multipart/related; type="application/dicom"; '
                                               'transfer-syntax=*', CLAIM_HEADER: key})
        with answer:
            try:
                media, params = media_type(answer.headers.get("content-type", ""))
                boundary = boundary_of(params) if media == "multipart/related" else b""
            except StowError as exc:
                raise HandOverError(f"WADO-RS answer not understood: {exc}") from None
            if media != "multipart/related":
                raise HandOverError(f"WADO-RS answered {media or 'nothing'}, not "
                                    f"multipart/related")
            try:
                with open(spool, "wb") as f:
                    for chunk in answer.iter_content(CHUNK):
                        f.write(chunk)
            except requests.RequestException as exc:
                raise HandOverError(f"WADO-RS ended early: {type(exc).__name__}") from None
        files = []
        try:
            with open(spool, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                    as body:
                for headers, start, end in split_parts(body, boundary):
                    path = folder / f"{len(files) + 1:05d}.dcm"
                    write_part(body, start, end, path)
                    files.append(path)
        except (StowError, ValueError) as exc:      # ValueError: an empty answer
            raise HandOverError(f"WADO-RS answer not understood: {exc}") from None
        finally:
            spool.unlink(missing_ok=True)
        return files

    def hand_back(self, job_id: int, attempt: int, key: str, paths: list[Path]
                  ) -> dict[str, str]:
        """Results to the node: SOP Instance UID -> the path the node filed it at. LeaseLost
        when the node says the claim is no longer this worker's."""
        body = multipart_files(((path, "application/dicom") for path in paths), _BOUNDARY)
        answer = self._call(
            "PUT", f"/worker/jobs/{job_id}/attempts/{attempt}/results", data=body,
            headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                     f'boundary={_BOUNDARY}', CLAIM_HEADER: key})
        stored = self._json(answer, "stored")
        if not isinstance(stored, dict):
            raise HandOverError("the node's answer lists no results")
        return stored

    def discard(self, job_id: int, attempt: int, key: str) -> None:
        self._call("DELETE", f"/worker/jobs/{job_id}/attempts/{attempt}/results",
                   headers={CLAIM_HEADER: key})


class OverHttp:
    """The node over HTTP, with the worker's own data folder (see the module)."""

    def __init__(self, client: NodeClient, layout: DataLayout) -> None:
        self.client = client
        self.layout = layout

    def instances(self, job: Job) -> list[str]:
        series = job.series
        started = time.perf_counter()
        files = self.client.retrieve_series(
            series.study_instance_uid, series.series_instance_uid,
            self.layout.work_folder(job.id, job.attempts) / "instances", job.claim_key)
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in files)
        log.info("job %d: %d instance(s), %.1f MB retrieved over WADO-RS in %.2f s "
                 "(%.0f MB/s)", job.id, len(files), size / 1e6, seconds,
                 size / 1e6 / max(seconds, 1e-6))
        if len(files) < series.instance_count:
            raise HandOverError(f"WADO-RS gave {len(files)} of the series' "
                                f"{series.instance_count} instances")
        return [str(f) for f in files]

    def results_folder(self, job: Job) -> Path:
        return self.layout.inside(self.layout.work_folder(job.id, job.attempts)) / "results"

    def publish(self, job: Job, records: list[dict]) -> list[dict]:
        filed = self.client.hand_back(job.id, job.attempts, job.claim_key,
                                      [Path(r["path"]) for r in records])
        if any(r["sop_instance_uid"] not in filed for r in records):
            raise HandOverError(f"the node filed {len(filed)} of {len(records)} results")
        return [{**r, "path": str(filed[r["sop_instance_uid"]])} for r in records]

    def discard(self, job: Job) -> None:
        """What this claim handed back is removed from the node (best effort: what stays
        is not recorded, and retention removes it with its series)."""
        try:
            self.client.discard(job.id, job.attempts, job.claim_key)
        except (HandOverError, LeaseLost) as exc:
            log.warning("job %d: the node kept the results of claim %d: %s", job.id,
                        job.attempts, exc)

    def finished(self, job: Job) -> None:
        self.layout.remove_tree(self.layout.work_folder(job.id, job.attempts))

    def clean(self) -> None:
        """At start: what a killed worker left in its work folder."""
        if self.layout.work.is_dir():
            for entry in self.layout.work.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    self.layout.remove_tree(entry)
                else:
                    entry.unlink()
