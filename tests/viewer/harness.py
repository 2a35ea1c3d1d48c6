"""What the viewer checks run: Orthanc (tests/orthanc.py), OHIF's prebuilt app served on
loopback, and the two Node programs of this folder.

* ``adapters/sr_check.mjs``: the published OHIF SR extension and Cornerstone adapters, in
  Node, reading a study from Orthanc's DICOMweb (:func:`sr_check`);
* ``ohif/drive.mjs``: OHIF 3.13.2 in Debian's headless Chromium, driven by playwright-core
  (:func:`drive_ohif`), served by :class:`OhifServer`: OHIF's ``dist/`` with its SPA
  fallback, ``/app-config.js`` from ``ohif/app-config.js``, and ``/dicom-web/`` proxied to
  Orthanc, all on one 127.0.0.1 origin.

Their npm packages are installed by ``scripts/setup.sh --test`` (``npm ci`` from the
lock files); :func:`missing` says, in one line, what is not there. Nothing is downloaded
here.

Serve a study by hand (Orthanc already running)::

    .venv/bin/python tests/viewer/harness.py --orthanc http://127.0.0.1:8042
"""

from __future__ import annotations

import argparse
import http.client
import json
import mimetypes
import posixpath
import re
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERS = HERE / "adapters"
OHIF = HERE / "ohif"
OHIF_DIST = OHIF / "node_modules" / "@ohif" / "app" / "dist"
CHROMIUM = "/usr/bin/chromium"
SETUP = "run scripts/setup.sh --test"

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")
mimetypes.add_type("application/json", ".json")
mimetypes.add_type("font/woff2", ".woff2")


#: The oldest Node.js major the viewer packages were run on here.
MIN_NODE = 20


def node() -> str | None:
    return shutil.which("node")


def missing() -> str | None:
    """One line saying what the viewer checks lack, or None when all is installed."""
    if node() is None:
        return f"node is not installed; {SETUP} (it installs Node.js and the viewer packages)"
    version = subprocess.run([node(), "--version"], capture_output=True, text=True).stdout
    major = int(re.match(r"v?(\d+)", version.strip()).group(1)) if re.match(
        r"v?\d+", version.strip()) else 0
    if major < MIN_NODE:
        return (f"node {version.strip() or '?'} is too old for the viewer packages (they were "
                f"checked on Node.js {MIN_NODE}+); install Node.js {MIN_NODE} or newer")
    for folder in (ADAPTERS, OHIF):
        lock = json.loads((folder / "package-lock.json").read_text())["packages"]
        for name in lock[""]["dependencies"]:
            installed = folder / "node_modules" / name / "package.json"
            if not installed.is_file():
                return (f"the npm packages of tests/viewer/{folder.name} are not installed; "
                        f"{SETUP} (it runs npm ci there)")
            version = json.loads(installed.read_text()).get("version")
            locked = lock[f"node_modules/{name}"]["version"]
            if version != locked:
                return (f"tests/viewer/{folder.name} has {name} {version}, its lock says "
                        f"{locked}; {SETUP} (it runs npm ci there)")
    if not (OHIF_DIST / "index.html").is_file():
        return f"{OHIF_DIST} has no index.html; {SETUP}"
    if not Path(CHROMIUM).is_file():
        return f"chromium is not installed ({CHROMIUM}); {SETUP}"
    return None


# ----------------------------------------------------------------------------- uploads

def upload(orthanc_url: str, paths) -> list[str]:
    """POST each DICOM file to Orthanc's REST API; the Orthanc ids of the instances."""
    ids = []
    for path in paths:
        request = urllib.request.Request(orthanc_url + "/instances", data=Path(path).read_bytes(),
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused {path}: {answer}")
        ids.append(answer["ID"])
    return ids


# ----------------------------------------------------------------------------- Node programs

def _node_json(script: Path, args: list[str], timeout: float, cwd: Path,
               ok: tuple[int, ...] = (0,)) -> dict:
    """Run a Node program that prints one JSON object as its last stdout line."""
    proc = subprocess.run([node() or "node", str(script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode not in ok or not lines:
        raise RuntimeError(f"{script.name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
                           f"\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def sr_check(dicomweb_root: str, study_uid: str, timeout: float = 120) -> dict:
    """What the OHIF SR extension and the adapters make of a study's SR and SEG
    (``adapters/sr_check.mjs``; the keys are described there)."""
    return _node_json(ADAPTERS / "sr_check.mjs", ["--dicomweb", dicomweb_root,
                                                  "--study", study_uid], timeout, ADAPTERS)


def drive_ohif(base_url: str, study_uid: str, out: Path, *, steps: str = "sr,seg",
               width: int = 1280, height: int = 800, timeout: float = 240,
               step_timeout_ms: int = 60000, orthanc_url: str | None = None,
               orthanc_instance: str | None = None) -> dict:
    """Open a study in OHIF in headless Chromium and hydrate its SR and SEG, in the order
    ``steps`` names them (``ohif/drive.mjs``): OHIF's state as JSON; screenshots in ``out``
    (study.png, sr-viewport.png, sr-boxes.png, seg-overlay.png; with ``orthanc_instance``,
    an Orthanc id, also orthanc-instance.png: Orthanc Explorer's page of it, preview open)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--orthanc", orthanc_url, "--orthanc-instance", orthanc_instance] \
        if orthanc_instance else []
    return _node_json(OHIF / "drive.mjs", [
        "--base", base_url, "--study", study_uid, "--out", str(out), "--steps", steps,
        "--chromium", CHROMIUM, "--size", f"{width}x{height}",
        "--step-timeout", str(step_timeout_ms), *extra], timeout, OHIF,
        ok=(0, 1))    # 1: a step failed; the JSON says which (its "error")


# ----------------------------------------------------------------------------- OHIF server

# Hop-by-hop headers are not forwarded either way (RFC 9110 7.6.1).
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
       "trailer", "transfer-encoding", "upgrade", "host"}
# As OHIF's own dev server: cross-origin isolation, so that SharedArrayBuffer is available.
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin",
             "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}


def _handler(dist: Path, config: Path, orthanc: urllib.parse.SplitResult, prefix: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "lungsys-ohif"

        def log_message(self, fmt, *args):  # noqa: N802 (the stdlib's name)
            pass

        def _proxy(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            # The browser's Host: Orthanc builds BulkDataURIs from it, so that they point
            # back at this server rather than at Orthanc's port.
            headers["Host"] = self.headers.get("Host", orthanc.netloc)
            conn = http.client.HTTPConnection(orthanc.hostname, orthanc.port, timeout=120)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except OSError as exc:
                self.send_error(502, f"orthanc unreachable: {exc}")
                return
            finally:
                conn.close()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            for k, v in ISOLATION.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _static(self):
            path = urllib.parse.urlsplit(self.path).path
            rel = posixpath.normpath(urllib.parse.unquote(path)).lstrip("/")
            if rel in ("", "."):
                rel = "index.html"
            if rel == "app-config.js":
                target = config
            else:
                target = (dist / rel).resolve()
                if dist not in target.parents and target != dist:
                    self.send_error(403)
                    return
                if not target.is_file():
                    # an app route: the SPA's index.html; a missing asset stays a 404
                    if "." in posixpath.basename(rel):
                        self.send_error(404)
                        return
                    target = dist / "index.html"
            data = target.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", mimetypes.guess_type(target.name)[0]
                             or "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for k, v in ISOLATION.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _dispatch(self):
            if self.path.startswith(prefix):
                self._proxy()
            elif self.command in ("GET", "HEAD"):
                self._static()
            else:
                self.send_error(405)

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _dispatch  # noqa: N815

    return Handler


class OhifServer:
    """OHIF's dist/ and a /dicom-web/ proxy to Orthanc, on 127.0.0.1, in a thread."""

    def __init__(self, orthanc_url: str, port: int = 0, dist: Path = OHIF_DIST,
                 config: Path = OHIF / "app-config.js") -> None:
        handler = _handler(Path(dist).resolve(), Path(config).resolve(),
                           urllib.parse.urlsplit(orthanc_url), "/dicom-web/")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def start(self) -> "OhifServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description="Serve OHIF on loopback for an Orthanc.")
    ap.add_argument("--orthanc", required=True, help="Orthanc's URL, e.g. http://127.0.0.1:8042")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    server = OhifServer(a.orthanc, a.port)
    print("OHIF on", server.url, flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
