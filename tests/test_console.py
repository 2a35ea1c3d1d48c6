"""The operations console in a real browser (Debian's Chromium, driven by Playwright).

An operator signs in, sees a phantom study sent with DCMTK's storescu being
received and its job done, opens the job and reads the diagnosis; the PACS
(Orthanc) is down, so the delivery fails; once it is up, the operator's
"retry" delivers, and the attempt appears on the page. A viewer sees no patient
name and may not retry (403); a form without the session's CSRF token is
refused; no address the browser visited carries patient data. The operator
also downloads the result objects, tests the destination, finds a short series
among the skipped, and re-runs the job with the other patient-level method.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import zipfile

import pydicom
import pytest

from conftest import eventually, require_tool
from console import EXE, add_users, chromium, http_status, launch, sign_in
from orthanc import Orthanc, free_port

pytestmark = pytest.mark.skipif(chromium() is None, reason="Debian's chromium is needed")


@pytest.fixture
def running(tmp_path, study_factory):
    """A ``lungsys serve`` whose only destination, an Orthanc, is not started yet."""
    pacs = Orthanc(tmp_path / "orthanc")
    port, http = free_port(), free_port()
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n'
        f'min_free_disk_mb = 1\n[http]\nport = {http}\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
        f'[assembly]\nstable_seconds = 120\n[model]\ndevice = "cpu"\nmirror = false\n'
        f'[delivery]\ninitial_backoff_seconds = 3600\nmax_backoff_seconds = 3600\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')
    add_users(toml)
    node = subprocess.Popen([EXE, "serve", "--config", str(toml)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.log", "w"))
    try:
        eventually(lambda: http_status(f"http://127.0.0.1:{http}/readyz") == 200
                   or node.poll() is not None, timeout=120)
        assert node.poll() is None, (tmp_path / "serve.log").read_text()
        yield {"base": f"http://127.0.0.1:{http}", "port": port, "pacs": pacs,
               "study": study_factory("covid", 21, 24), "toml": toml,
               "short": study_factory("healthy", 22, 6)}
    finally:
        node.terminate()
        node.wait(60)
        pacs.stop()


def storescu(port: int, files) -> None:
    proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                           "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
    assert proc.returncode == 0, proc.stderr


def reloaded_until(page, selector: str, pattern: str, timeout: float = 180) -> str:
    """Reload ``page`` until ``selector``'s text matches ``pattern`` (as an admin does)."""
    def look():
        page.reload()
        found = page.query_selector(selector)
        return found is not None and re.search(pattern, found.inner_text()) and \
            found.inner_text()
    return eventually(look, timeout=timeout, every=0.3)


def test_an_operator_follows_a_study_and_retries_its_delivery(running):
    from playwright.sync_api import sync_playwright

    base, study, pacs = running["base"], running["study"], running["pacs"]
    ct = pydicom.dcmread(study.files[0])
    patient = str(ct.PatientName)
    visited: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        olga = sign_in(browser, base, "olga")
        olga.on("request", lambda r: visited.append(r.url))

        # receiving, then done, as the dashboard and the job list show it. The series says
        # how many images it has (Images in Acquisition): it is complete as soon as the last
        # arrives, so that one is held back while the operator looks ([assembly]
        # stable_seconds keeps the series receiving meanwhile)
        *first, last = study.files
        storescu(running["port"], first)
        receiving = reloaded_until(olga, "#receiving", re.escape(ct.SeriesInstanceUID[-16:]),
                                   timeout=60)
        assert f"{len(first)} of {len(study.files)}" in receiving
        storescu(running["port"], [last])
        olga.click("text=All jobs")
        reloaded_until(olga, "#jobs tbody tr", r"\bdone\b")
        row = olga.inner_text("#jobs tbody tr")
        assert patient in row and "CT1" in row          # an operator sees the patient
        olga.click("#jobs tbody tr a")
        job_url = olga.url
        diagnosis = olga.inner_text("#diagnosis")
        assert diagnosis in ("Healthy", "COVID-19", "H1N1", "CAP")
        assert olga.inner_text("#patient").startswith(patient)
        # the analysis log of the job: the worker records it as the job ends, just after
        # the job's state turns done
        reloaded_until(olga, "#job-log", r"job 1 done", timeout=60)

        # the PACS is down: the first attempt failed; up again, the operator retries
        attempts = reloaded_until(olga, ".delivery", r"1 attempt", timeout=60)
        assert "failed" in attempts and "pending" in attempts
        pacs.start()
        olga.click("button.retry-delivery")
        assert "The delivery will be tried now." in olga.inner_text("[role=status]")
        text = reloaded_until(olga, ".delivery", r"delivered \d{4}-", timeout=120)
        assert re.search(r"2 attempt\(s\)", text)
        rows = olga.query_selector_all(".delivery table.attempts tbody tr")
        assert [r.query_selector_all("td")[2].inner_text() for r in rows] == \
            ["failed", "delivered"]
        series = [pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality")
                  for s in pacs.get("/series")]
        assert "SR" in series                               # in the PACS for real

        # a form without the session's CSRF token changes nothing
        for form in ({}, {"csrf": "not-the-token"}):
            answer = olga.request.post(f"{job_url}/retry", form=form)
            assert answer.status == 403 and "CSRF" in answer.text()
        olga.reload()
        assert olga.inner_text("#job-state") == "done"

        # the result objects as a ZIP: the SR among them, named without patient data
        with olga.expect_download() as download:
            olga.click("#download")
        with zipfile.ZipFile(download.value.path()) as z:
            names = z.namelist()
            assert any("SR" in n for n in names) and not any(patient[:7] in n for n in names)
            sr = pydicom.dcmread(io.BytesIO(z.read(next(n for n in names if "SR" in n))))
            assert sr.StudyInstanceUID == ct.StudyInstanceUID

        # the destination answers its test now
        olga.goto(f"{base}/console/destinations")
        olga.click("#destination-1 button")
        assert "C-ECHO ORTHANC@127.0.0.1" in olga.inner_text("#destination-1 .test-result")

        # a series too short to analyse is listed as skipped, with the reason
        storescu(running["port"], running["short"].files)
        olga.goto(f"{base}/console/skipped")
        short_uid = pydicom.dcmread(running["short"].files[0]).SeriesInstanceUID
        reason = reloaded_until(olga, "#skipped tbody", re.escape(short_uid), timeout=60)
        assert "fewer than the minimum of 20" in reason

        # a re-run with the other patient-level method: a new job of the same series
        olga.goto(job_url)
        olga.select_option("select[name=method]", "nonparametric")
        olga.click("#rerun")
        assert "A re-run is queued" in olga.inner_text("[role=status]")
        assert olga.url != job_url
        reloaded_until(olga, "#job-state", "done")   # as long as the first job
        reloaded_until(olga, "#job-log", "method nonparametric", timeout=60)

        # a viewer: no patient name anywhere, no retry, and a retry posted anyway is 403
        victor = sign_in(browser, base, "victor")
        victor.on("request", lambda r: visited.append(r.url))
        victor.goto(job_url)
        assert victor.inner_text("#diagnosis") == diagnosis
        assert patient not in victor.content() and str(ct.PatientID) not in victor.content()
        assert victor.query_selector("button.retry-delivery") is None
        assert victor.query_selector("#retry-job") is None
        victor.goto(f"{base}/console/jobs")
        assert patient not in victor.content()
        csrf = victor.get_attribute("form.who input[name=csrf]", "value")
        answer = victor.request.post(f"{job_url}/retry", form={"csrf": csrf})
        assert answer.status == 403 and "operator" in answer.text()
        assert victor.request.get(f"{base}/console/config").status == 403   # admin only
        assert victor.request.get(f"{job_url}/results.zip").status == 403

        # signed out: the session is over
        victor.click("form.who button")
        victor.goto(job_url)
        assert "/console/signin" in victor.url
        browser.close()
    for url in visited:           # patient data never in an address
        assert patient.split("^")[0] not in url and str(ct.PatientID) not in url, url


def test_sign_in_is_refused_for_a_wrong_password_and_limited_per_address(running):
    from playwright.sync_api import sync_playwright

    base = running["base"]
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page()
        for attempt in range(6):
            page.goto(f"{base}/console/signin")
            page.fill("input[name=name]", "olga")
            page.fill("input[name=password]", f"wrong-{attempt}")
            page.click("form.signin button[type=submit]")
            message = page.inner_text("[role=alert]")
            expected = "not accepted" if attempt < 5 else "Too many failed sign-ins"
            assert expected in message, (attempt, message)
        assert "/console/signin" in page.url and page.query_selector("#whoami") is None
        browser.close()
