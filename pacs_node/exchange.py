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
from typing import Iterator

import requests

from pacs_node.layout import DataLayout
from pacs_node.stow import StowError, media_type, split_parts
from pacs_node.wado import WORKER_HEADER
from store.api import LeaseLost
from store.models import Job

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
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
            except ValueError:
                why = answer.reason
            answer.close()
            raise HandOverError(f"{method} {self.url}{path}: HTTP {answer.status_code} "
                                f"{str(why)[:200]}")
        return answer

    def node_id(self) -> str:
        """The node's id in the job store (and a check of the token)."""
        return str(self._call("GET", "/worker/node").json()["node"])

    def retrieve_series(self, study: str, series: str, folder: Path, worker: str
                        ) -> list[Path]:
        """WADO-RS: the series' instances as files in ``folder`` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        spool = folder / ".retrieved"
        answer = self._call("GET", f"/dicom-web/studies/{study}/series/{series}", stream=True,
                            headers={"Accept": 'multipart/related; type="application/dicom"; '
                                               'transfer-syntax=*', WORKER_HEADER: worker})
        with answer:
            media, params = media_type(answer.headers.get("content-type", ""))
            if media != "multipart/related" or not params.get("boundary"):
                raise HandOverError(f"WADO-RS answered {media or 'nothing'}, not "
                                    f"multipart/related")
            try:
                with open(spool, "wb") as f:
                    for chunk in answer.iter_content(_CHUNK):
                        f.write(chunk)
            except requests.RequestException as exc:
                raise HandOverError(f"WADO-RS ended early: {type(exc).__name__}") from None
        files = []
        try:
            with open(spool, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                    as body:
                for headers, start, end in split_parts(body, params["boundary"].encode()):
                    path = folder / f"{len(files) + 1:05d}.dcm"
                    with open(path, "wb") as out:
                        for pos in range(start, end, _CHUNK):
                            out.write(body[pos:min(pos + _CHUNK, end)])
                    files.append(path)
        except (StowError, ValueError) as exc:      # ValueError: an empty answer
            raise HandOverError(f"WADO-RS answer not understood: {exc}") from None
        finally:
            spool.unlink(missing_ok=True)
        return files

    def hand_back(self, job_id: int, attempt: int, worker: str, paths: list[Path]
                  ) -> dict[str, str]:
        """Results to the node: SOP Instance UID -> the path the node filed it at. LeaseLost
        when the node says the claim is no longer this worker's."""
        def body() -> Iterator[bytes]:
            for path in paths:
                yield (f"--{_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n"
                       ).encode("ascii")
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        yield chunk
                yield b"\r\n"
            yield f"--{_BOUNDARY}--\r\n".encode("ascii")

        try:
            answer = self._call(
                "PUT", f"/worker/jobs/{job_id}/attempts/{attempt}/results", data=body(),
                headers={"Content-Type": f'multipart/related; type="application/dicom"; '
                                         f'boundary={_BOUNDARY}', WORKER_HEADER: worker})
        except HandOverError as exc:
            if " HTTP 409 " in str(exc):
                raise LeaseLost(f"job {job_id}: the node says claim {attempt} is no longer "
                                f"this worker's") from None
            raise
        return answer.json()["stored"]

    def discard(self, job_id: int, attempt: int) -> None:
        self._call("DELETE", f"/worker/jobs/{job_id}/attempts/{attempt}/results")


class OverHttp:
    """The node over HTTP, with the worker's own data folder (see the module)."""

    def __init__(self, client: NodeClient, layout: DataLayout, worker: str) -> None:
        self.client = client
        self.layout = layout
        self.worker = worker

    def instances(self, job: Job) -> list[str]:
        series = job.series
        started = time.perf_counter()
        files = self.client.retrieve_series(
            series.study_instance_uid, series.series_instance_uid,
            self.layout.work_folder(job.id, job.attempts) / "instances", self.worker)
        seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in files)
        log.info("job %d: %d instance(s), %.1f MB retrieved over WADO-RS in %.1f s "
                 "(%.0f MB/s)", job.id, len(files), size / 1e6, seconds,
                 size / 1e6 / max(seconds, 1e-6))
        if len(files) < series.instance_count:
            raise HandOverError(f"WADO-RS gave {len(files)} of the series' "
                                f"{series.instance_count} instances")
        return [str(f) for f in files]

    def results_folder(self, job: Job) -> Path:
        return self.layout.inside(self.layout.work_folder(job.id, job.attempts)) / "results"

    def publish(self, job: Job, records: list[dict]) -> list[dict]:
        filed = self.client.hand_back(job.id, job.attempts, self.worker,
                                      [Path(r["path"]) for r in records])
        missing = [r["sop_instance_uid"] for r in records if r["sop_instance_uid"] not in filed]
        if missing:
            raise HandOverError(f"the node filed {len(filed)} of {len(records)} results")
        return [{**r, "path": filed[r["sop_instance_uid"]]} for r in records]

    def discard(self, job: Job) -> None:
        try:
            self.client.discard(job.id, job.attempts)
        except HandOverError as exc:
            log.warning("job %d: the node kept the results of a lost claim: %s", job.id, exc)

    def finished(self, job: Job) -> None:
        self.layout.remove_tree(self.layout.work_folder(job.id, job.attempts))

    def clean(self) -> None:
        """At start: what a killed worker left in its work folder."""
        if self.layout.work.is_dir():
            for folder in self.layout.work.iterdir():
                self.layout.remove_tree(folder)
