"""The console's jobs: the filtered list, a job's page, and what an operator does there.

The operations are the CLI's (``lungsys jobs retry``, ``deliveries retry``),
plus a re-run with another model or method (a new version of the series'
results) and a download of a job's result objects as one ZIP. Patient name
and ID are read from the series' first instance, for operators only, and are
never put in a URL (filters and links name jobs by number).
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import zipfile
from http import HTTPStatus
from typing import TYPE_CHECKING

import anyio
import pydicom
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from inference.choices import PatientMethod
from inference.model_info import recorded_low_confidence
from pacs_node.layout import OutsideDataDir
from pacs_node.web.auth import Doorkeeper
from pacs_node.web.console.render import PER_PAGE, page, page_number
from store.accounts import Role
from store.console import JobFilter
from store.models import DeliveryState, JobState

log = logging.getLogger("pacs_node.web.console")

if TYPE_CHECKING:
    from pacs_node.node import Node


#: What the flash line of a job's page says after an operation (its code is in the URL).
DONE = {"retried": "The job is queued again.", "delivery": "The delivery will be tried now.",
        "rerun": "A re-run is queued: it is the newest job of this series."}


def patients_of(node: "Node", series_ids: list[int]) -> dict[int, dict[str, str]]:
    """Patient name and ID of each series, from one of its instances ({} for a series
    whose files are gone). Only for operators' pages."""
    out: dict[int, dict[str, str]] = {}
    for series_id, path in node.store.first_instance_paths(series_ids).items():
        try:
            ds = pydicom.dcmread(node.layout.inside(path), stop_before_pixels=True,
                                 specific_tags=["PatientName", "PatientID"])
        except Exception:           # the file is gone or unreadable: nothing to show
            continue
        out[series_id] = {"name": str(ds.get("PatientName", "")),
                          "id": str(ds.get("PatientID", ""))}
    return out


def _filter(request: Request) -> tuple[JobFilter, list[str]]:
    """The list's filters from the query (a value that is not one is dropped, said so)."""
    q, problems = request.query_params, []

    def date(key: str) -> dt.date | None:
        if not q.get(key):
            return None
        try:
            return dt.date.fromisoformat(q[key])
        except ValueError:
            problems.append(f"{key}: not a date (YYYY-MM-DD)")
            return None

    def choice(key: str, allowed: set[str]) -> str:
        value = q.get(key, "")
        if value and value not in allowed:
            problems.append(f"{key}: one of {', '.join(sorted(allowed))}")
            return ""
        return value

    return JobFilter(state=choice("state", {s.value for s in JobState}),
                     diagnosis=q.get("diagnosis", "")[:16],
                     calling_aet=q.get("calling_aet", "")[:16],
                     delivery=choice("delivery", {s.value for s in DeliveryState}),
                     since=date("since"), until=date("until")), problems


def _zip_job(node: "Node", job_id: int):
    """A job's result files (only those inside the data folder) as a ZIP in a spooled
    temporary file, at its start; None when there is none."""
    paths = []
    for recorded in node.store.result_paths(job_id):
        try:
            path = node.layout.inside(recorded)
        except OutsideDataDir:
            continue                # never serve a file from outside the data folder
        if path.is_file():
            paths.append(path)
    if not paths:
        return None
    spool = tempfile.SpooledTemporaryFile(max_size=8 << 20, dir=node.layout.root)
    try:
        with zipfile.ZipFile(spool, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            for path in paths:
                z.write(path, f"{path.parent.name}-{path.name}")
    except BaseException:           # a file removed by retention meanwhile, a full disk
        spool.close()
        raise
    spool.seek(0)
    return spool


def job_routes(node: "Node", door: Doorkeeper) -> list[Route]:
    store = node.store

    async def jobs(request: Request) -> Response:
        me = await door.page(request, Role.viewer)
        if isinstance(me, Response):
            return me
        where, problems = _filter(request)
        number = page_number(request)
        rows, total = await anyio.to_thread.run_sync(store.job_page, where, number, PER_PAGE)
        patients = {}
        if me.role.allows(Role.operator):
            by_series = await anyio.to_thread.run_sync(patients_of, node,
                                                       [j.series_id for j in rows])
            patients = {j.id: by_series.get(j.series_id, {}) for j in rows}
        query = {k: v for k, v in request.query_params.items() if k != "page" and v}
        aets, diagnoses = await anyio.to_thread.run_sync(
            lambda: (store.calling_aets(), store.diagnoses()))
        return page(request, me, "jobs.html", jobs=rows, total=total, number=number,
                    pages=max(1, -(-total // PER_PAGE)), where=where, problems=problems,
                    query=query, patients=patients, aets=aets, diagnoses=diagnoses,
                    states=[s.value for s in JobState],
                    delivery_states=[s.value for s in DeliveryState])

    async def job(request: Request) -> Response:
        me = await door.page(request, Role.viewer)
        if isinstance(me, Response):
            return me
        found = await anyio.to_thread.run_sync(store.job, request.path_params["job_id"])
        if found is None:
            return page(request, me, "message.html", HTTPStatus.NOT_FOUND,
                        title="No such job", message=f"There is no job "
                                                     f"{request.path_params['job_id']}.")
        patient = ((await anyio.to_thread.run_sync(patients_of, node, [found.series_id]))
                   .get(found.series_id, {}) if me.role.allows(Role.operator) else {})
        choices = ["", *node.config.model.choices]
        return page(request, me, "job.html", job=found, series=found.series, patient=patient,
                    low_confidence=recorded_low_confidence(found.probabilities),
                    done=DONE.get(request.query_params.get("done", ""), ""),
                    models=choices, methods=["", *(m.value for m in PatientMethod)])

    async def operate(request: Request, what: str, work) -> Response:
        """An operator's POST: role, CSRF, then ``work(form)`` -> where to go back; logged
        (who did ``what``) as an audit line."""
        posted = await door.posted(request, Role.operator)
        if isinstance(posted, Response):
            return posted
        me, form = posted
        try:
            target = await anyio.to_thread.run_sync(work, form)
            log.info("console: %s %s", me.name, what)
        except (LookupError, ValueError) as exc:
            return page(request, me, "message.html", HTTPStatus.CONFLICT, title="Not done",
                        message=str(exc))
        return RedirectResponse(target, status_code=HTTPStatus.SEE_OTHER)

    async def retry_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def work(form) -> str:
            store.retry_job(job_id)
            node.wake_worker()
            return f"/console/jobs/{job_id}?done=retried"
        return await operate(request, f"retried job {job_id}", work)

    async def retry_delivery(request: Request) -> Response:
        def work(form) -> str:
            delivery = store.retry_delivery(request.path_params["delivery_id"])
            return f"/console/jobs/{delivery.job_id}?done=delivery"
        return await operate(request, f"retried delivery {request.path_params['delivery_id']}",
                             work)

    async def rerun(request: Request) -> Response:
        job_id = request.path_params["job_id"]

        def work(form) -> str:
            model, method = form.get("model", ""), form.get("method", "")
            if model not in node.config.model.choices and model:
                raise ValueError("that model is not one of [model] choices")
            if method and method not in {m.value for m in PatientMethod}:
                raise ValueError(f"method: one of {', '.join(PatientMethod)}")
            new = store.rerun_job(job_id, model, method)
            log.info("console: job %d is a re-run of job %d (model %s, method %s)", new.id,
                     job_id, model or "the node's", method or "the node's")
            node.wake_worker()
            return f"/console/jobs/{new.id}?done=rerun"
        return await operate(request, f"re-ran job {job_id}", work)

    async def download(request: Request) -> Response:
        me = await door.page(request, Role.operator)
        if isinstance(me, Response):
            return me
        job_id = request.path_params["job_id"]
        spool = await anyio.to_thread.run_sync(_zip_job, node, job_id)
        if spool is None:
            return page(request, me, "message.html", HTTPStatus.NOT_FOUND, title="No results",
                        message=f"Job {job_id} has no result files (none written, or "
                                f"removed by retention).")
        log.info("console: %s downloaded the results of job %d", me.name, job_id)

        def chunks():
            with spool:
                while block := spool.read(1 << 20):
                    yield block
        return StreamingResponse(chunks(), media_type="application/zip", headers={
            "Content-Disposition": f'attachment; filename="lungsys-job-{job_id}-results.zip"',
            "Cache-Control": "no-store"}, background=BackgroundTask(spool.close))

    return [Route("/console/jobs", jobs, methods=["GET"]),
            Route("/console/jobs/{job_id:id}", job, methods=["GET"]),
            Route("/console/jobs/{job_id:id}/retry", retry_job, methods=["POST"]),
            Route("/console/jobs/{job_id:id}/rerun", rerun, methods=["POST"]),
            Route("/console/jobs/{job_id:id}/results.zip", download, methods=["GET"]),
            Route("/console/deliveries/{delivery_id:id}/retry", retry_delivery,
                  methods=["POST"])]
