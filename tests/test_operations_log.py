"""What an admin reads: the node's log at INFO (started, series received, job done,
delivery failed once as one WARNING, given up as one ERROR, stopped), never a patient's
name, ID or birth date; and ``lungsys jobs list --state failed`` with the deliveries that
gave up, their attempts and last error."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom

from conftest import eventually, require_tool
from orthanc import free_port, held_port

EXE = str(Path(sys.executable).with_name("lungsys"))




def _jobs(toml: Path, *args: str):
    proc = subprocess.run([EXE, "jobs", "list", "--config", str(toml), *args, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_log_says_what_happened_and_failed_deliveries_are_listed(tmp_path,
                                                                       study_factory):
    study = study_factory("covid", 5, 24)
    down = held_port()                             # a destination that is not there
    port, nobody = free_port(), down.getsockname()[1]
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "var"}"\n'
        f'min_free_disk_mb = 1\n[dicomweb]\nport = 0\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
        f'[assembly]\nstable_seconds = 2\n[model]\ndevice = "cpu"\nmirror = false\n'
        f'[delivery]\ninitial_backoff_seconds = 1\nmax_backoff_seconds = 1\nmax_attempts = 2\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "PACS"\n'
        f'host = "127.0.0.1"\nport = {nobody}\n')
    log = tmp_path / "node.log"
    with open(log, "wb") as sink:
        node = subprocess.Popen([EXE, "serve", "--config", str(toml)], stdout=sink,
                                stderr=subprocess.STDOUT)
    try:
        eventually(lambda: "listening on" in log.read_text(), timeout=120)
        proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                               "127.0.0.1", str(port), *map(str, study.files)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        eventually(lambda: "given up" in log.read_text())
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(timeout=60)
        down.close()
    assert node.returncode == 0
    text = log.read_text()
    lines = text.splitlines()

    def one(pattern: str, level: str) -> str:
        found = [line for line in lines if re.search(pattern, line)]
        assert len(found) == 1, (pattern, found)
        assert f" {level} " in found[0], found[0]
        return found[0]

    started = one(r"LUNGSYS listening on 127\.0\.0\.1:\d+", "INFO")
    assert re.search(r"model small-[0-9a-f]+ \(M3 Lung-Sys\) on cpu", started), started
    one(r"series [0-9.]+ from CT1 complete \(24 instances\): job 1 queued", "INFO")
    done = one(r"job 1 done in [0-9.]+ s: (Healthy|COVID-19|H1N1|CAP) \(p=", "INFO")
    one(r"delivery 1 of job 1 to pacs failed \(attempt 1 of 2, next in \d+ s\): .*connection "
        r"refused", "WARNING")
    one(r"delivery 1 of job 1 to pacs given up after 2 attempt\(s\): .*lungsys deliveries "
        r"retry 1", "ERROR")
    one(r"SIGTERM: stopping", "INFO")
    one(r"lungsys stopped", "INFO")
    # the node's own lines only: no library chatter (highdicom, pynetdicom ...)
    names = {m.group(1).split(".")[0] for m in (re.match(r"\S+ \S+ [A-Z]+ (\S+): ", line)
                                                for line in lines) if m}
    assert names <= {"lungsys", "pacs_node", "store", "inference", "config"}, names
    # pynetdicom's own connection errors are folded into those lines
    assert [line for line in lines if " ERROR " in line] == \
        [line for line in lines if "given up" in line]
    # no patient name, ID or birth date above DEBUG
    ct = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    for value in (str(ct.PatientName), str(ct.PatientName).split("^")[0], ct.PatientID,
                  ct.PatientBirthDate):
        assert value and value not in text, value
    assert done

    # the job is done, but its delivery failed: --state failed lists it, and says why
    [job] = _jobs(toml, "--state", "failed")
    assert job["state"] == "done" and job["diagnosis"]
    [delivery] = job["deliveries"]
    assert delivery["state"] == "failed" and delivery["attempts"] == 2
    assert "connection refused" in delivery["last_error"]
    assert [a["ok"] for a in delivery["attempt_history"]] == [False, False]
    assert all("connection refused" in a["error"] for a in delivery["attempt_history"])
    assert _jobs(toml, "--state", "done")[0]["id"] == job["id"]
    table = subprocess.run([EXE, "jobs", "list", "--config", str(toml), "--state", "failed"],
                           capture_output=True, text=True, timeout=60, env={"COLUMNS": "200",
                                                                            "PATH": ""})
    assert "done, delivery failed" in table.stdout and "1 pacs failed (2)" in table.stdout


def test_no_request_can_forge_a_line_of_the_log():
    """A path is logged as the client sent it, percent-decoded: ``%0A`` once let one
    anonymous GET write "console: admin (admin) signed in" as a line of its own, and
    ``%1B`` colour the admin's terminal. Every message is one line; a traceback keeps its
    lines, each behind "| ", so that an exception quoting a sender forges none either."""
    script = (
        "import logging\n"
        "from pacs_node import configure_logging\n"
        "configure_logging(logging.INFO)\n"
        "logging.getLogger('pacs_node.web.access').info(\n"
        "    '%s %s', 'GET', '/x\\n2026-12-02 10:00:00 INFO pacs_node.web.console: admin "
        "signed in\\r\\x1b[31m\\x00\\x85')\n"
        "try:\n"
        "    raise ValueError('boom\\n2026-12-02 10:00:01 INFO x: admin signed out\\x1b')\n"
        "except ValueError:\n"
        "    logging.getLogger('pacs_node').exception('a fault of its own')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    [forged] = [line for line in lines if "signed in" in line]
    assert "INFO pacs_node.web.access: GET /x\\x0a2026-12-02" in forged
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr and "\x00" not in proc.stderr
    assert "\\x1b[31m\\x00\\x85" in forged
    assert lines[-2:] == ["| ValueError: boom",
                          "| 2026-12-02 10:00:01 INFO x: admin signed out\\x1b"]
    assert lines[-3].startswith("| ") and "Traceback" in proc.stderr
    [record] = [line for line in lines if not line.startswith("| ") and "fault" in line]
    assert record.endswith("ERROR pacs_node: a fault of its own")


def test_an_exception_is_logged_in_one_line_even_when_it_says_nothing():
    """A driver's message runs on with its SQL; a library's may be empty. The node's log
    lines and rows' errors take the first line, or the type: an empty message once made
    the line's own formatting raise IndexError inside the handler meant to log it."""
    from sqlalchemy.exc import OperationalError

    from pacs_node import one_line

    driver = OperationalError("SELECT * FROM jobs WHERE id = ?", (7,),
                              Exception("database is locked"))
    assert one_line(driver) == "(builtins.Exception) database is locked"
    assert one_line(OSError()) == "OSError" and one_line(ValueError("  \n ")) == "ValueError"
    assert len(one_line(ValueError("x" * 1000))) == 200
    # credentials are scrubbed before the cut, which could leave half of one unmatched
    from pacs_node.delivery import redact
    leaky = ValueError("x" * 170 + " https://pacs-user:s3cret-password@pacs.example/rs")
    assert "s3cret" not in one_line(leaky, redact) and "pacs.example" in one_line(leaky, redact)


def test_a_fault_of_the_node_is_one_error_line_and_its_traceback_debug():
    """A 500 is one ERROR line naming the fault and where; uvicorn's own "Exception in
    ASGI application" had followed it with the traceback, at ERROR, for every such fault."""
    script = (
        "import logging, urllib.request, urllib.error\n"
        "from starlette.routing import Route\n"
        "from pacs_node import configure_logging\n"
        "from pacs_node.peers import PeerGate\n"
        "from pacs_node.web.app import make_app\n"
        "from pacs_node.web.server import HttpServer\n"
        "configure_logging(logging.INFO)\n"
        "def boom(request):\n"
        "    raise RuntimeError('a fault')\n"
        "server = HttpServer(make_app([Route('/boom', boom)]), PeerGate())\n"
        "server.start('127.0.0.1', 0)\n"
        "try:\n"
        "    urllib.request.urlopen(f'http://127.0.0.1:{server.port}/boom', timeout=30)\n"
        "except urllib.error.HTTPError as exc:\n"
        "    print(exc.code, exc.read().decode())\n"
        "server.stop()\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == '500 {"error":"internal error"}', proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "HTTP GET /boom failed: RuntimeError in <string>:" in errors[0]
    assert "Traceback" not in proc.stderr and "| " not in proc.stderr, proc.stderr
