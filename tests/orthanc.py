"""A real Orthanc PACS for tests: Debian's package, on loopback, in a temp folder."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_port() -> socket.socket:
    """A loopback port bound and never listened on (``.getsockname()[1]``): it refuses
    every connection, and no other process (another test worker's PACS) can take it
    until the socket is closed. A free port left unbound can be taken meanwhile: a
    destination meant to be down then answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s


class Orthanc:
    def __init__(self, folder: Path, aet: str = "ORTHANC",
                 dicomweb_servers: dict[str, str | list[str]] | None = None) -> None:
        """``dicomweb_servers``: name -> DICOMweb root URL that Orthanc may STOW to (or
        [URL, user name, password]: HTTP Basic)."""
        self.folder = Path(folder)
        self.aet = aet
        self.dicomweb_servers = dict(dicomweb_servers or {})
        # held until the first start: a test that sends to it before starting it (a PACS
        # that is down) sees its connections refused, never another worker's server
        self._held = [held_port(), held_port()]
        self.dicom_port, self.http_port = (s.getsockname()[1] for s in self._held)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "Orthanc":
        if not Path(ORTHANC).exists():
            raise RuntimeError("Orthanc is not installed; run scripts/setup.sh")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lungsys-test", "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"), "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/",
                         "Servers": {k: [v] if isinstance(v, str) else v
                                     for k, v in self.dicomweb_servers.items()}},
            "DicomCheckCalledAet": False, "HttpServerEnabled": True,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        while self._held:
            self._held.pop().close()
        self.proc = subprocess.Popen([ORTHANC, str(path)], stdin=subprocess.DEVNULL,
                                     stdout=open(self.folder / "orthanc.log", "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        while self._held:                   # never started
            self._held.pop().close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: dict, timeout: float = 120):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body
