"""Who may use the HTTP service: STOW-RS tokens by role, HTTPS, the session cookie, and
the users and tokens commands.

STOW-RS without a token is 401, with a viewer's 403, with an operator's or a
sender's stored (Bearer, or HTTP Basic with the token as password); a revoked
token is 401 at once. The service speaks HTTPS with a test certificate made by
openssl, and its session cookie is then Secure, HttpOnly and SameSite. The job
store keeps an argon2id hash of a password and the digest of a token, never
either of them.
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid

import pytest
import requests

from config import load_config
from conftest import require_tool
from console import EXE, PASSWORDS, add_users, lungsys
from doubles import hotspot_model
from orthanc import free_port
from pacs_node.web.auth import TOKEN_CACHE_SECONDS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("https")
    cert, key = folder / "node.pem", folder / "node.key"
    subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=lungsys test", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
def https_node(tmp_path, certificate):
    from inference.engine import Engine
    from pacs_node.node import Node

    cert, key = certificate
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {free_port()}\ndata_dir = "{tmp_path / "var"}"\n'
        f'min_free_disk_mb = 1\n[http]\nport = {free_port()}\n'
        f'tls_certificate = "{cert}"\ntls_private_key = "{key}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
        f'[assembly]\nstable_seconds = 30\n')
    add_users(toml)
    tokens = {role: lungsys("tokens", "create", f"{role}-client", "--role", role,
                            "--config", str(toml))
              for role in ("sender", "viewer", "operator")}
    node = Node(load_config(toml, environ={}), Engine(hotspot_model(), device="cpu"))
    node.start()
    try:
        yield {"node": node, "toml": toml, "tokens": tokens, "cafile": str(cert),
               "base": f"https://127.0.0.1:{node.stow_port}"}
    finally:
        node.stop()


def stow(base: str, cafile: str, payload: bytes, headers: dict) -> requests.Response:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + payload
            + f"\r\n--{boundary}--\r\n".encode())
    return requests.post(f"{base}/dicom-web/studies", data=body, verify=cafile, timeout=60,
                         headers={"Content-Type": f'multipart/related; '
                                  f'type="application/dicom"; boundary={boundary}', **headers})


def test_stow_rs_over_https_needs_a_token_whose_role_may_store(https_node, covid_study):
    base, cafile, tokens = https_node["base"], https_node["cafile"], https_node["tokens"]
    store = https_node["node"].store
    files = [f.read_bytes() for f in covid_study.files[:4]]

    nobody = stow(base, cafile, files[0], {})
    assert nobody.status_code == 401 and "Bearer" in nobody.headers["WWW-Authenticate"]
    assert stow(base, cafile, files[0], {"Authorization": "Bearer lsy_guess"}).status_code == 401
    viewer = stow(base, cafile, files[0], {"Authorization": f"Bearer {tokens['viewer']}"})
    assert viewer.status_code == 403 and "viewer" in viewer.json()["error"]
    assert store.counts()["instances"] == 0

    assert stow(base, cafile, files[0],
                {"Authorization": f"Bearer {tokens['operator']}"}).status_code == 200
    assert stow(base, cafile, files[1],
                {"Authorization": f"Bearer {tokens['sender']}"}).status_code == 200
    basic = base64.b64encode(f"ct-2:{tokens['sender']}".encode()).decode()
    assert stow(base, cafile, files[2], {"Authorization": f"Basic {basic}"}).status_code == 200
    assert store.counts()["instances"] == 3

    lungsys("tokens", "revoke", "sender-client", "--config", str(https_node["toml"]))
    time.sleep(TOKEN_CACHE_SECONDS)      # the node believes a token it found for a second
    assert stow(base, cafile, files[3],
                {"Authorization": f"Bearer {tokens['sender']}"}).status_code == 401
    listed = lungsys("tokens", "list", "--config", str(https_node["toml"]))
    assert "viewer-client" in listed and "sender-client" not in listed
    assert not any(t in listed for t in tokens.values())

    # plain HTTP on the HTTPS port gets nowhere
    with pytest.raises(requests.ConnectionError):
        requests.get(base.replace("https", "http") + "/healthz", timeout=10)


def test_the_session_cookie_over_https_and_the_console_headers(https_node):
    base, cafile = https_node["base"], https_node["cafile"]
    with requests.Session() as browser:
        browser.verify = cafile
        browser.trust_env = False     # REQUESTS_CA_BUNDLE would win over .verify
        form = browser.get(f"{base}/console/signin", timeout=30)
        nonce = form.text.split('name="nonce" value="')[1].split('"')[0]
        # the sign-in form must come from the node (its nonce cookie), or it is refused
        forged = requests.post(f"{base}/console/signin", verify=cafile, timeout=30,
                               data={"name": "ada", "password": PASSWORDS["ada"],
                                     "nonce": nonce}, allow_redirects=False)
        assert forged.status_code == 403
        signed = browser.post(f"{base}/console/signin", timeout=30, allow_redirects=False,
                              data={"name": "ada", "password": PASSWORDS["ada"],
                                    "nonce": nonce, "next": "//evil.example/"})
        assert signed.status_code == 303 and signed.headers["location"] == "/console/"
        [cookie] = [c for c in signed.raw.headers.getlist("set-cookie")
                    if c.startswith("lungsys_session=")]
        assert "Secure" in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()
        page = browser.get(f"{base}/console/config", timeout=30)
        assert page.status_code == 200 and "[http]" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["cache-control"] == "no-store"
        assert page.headers["strict-transport-security"] == "max-age=31536000"
        # the admin's users page lists the users, never a hash
        users = browser.get(f"{base}/console/users", timeout=30).text
        assert "olga" in users and "argon2" not in users

        # a form that cannot be read says why (it had blamed the CSRF token, and the admin
        # reloaded a page whose form could never pass); the session goes on
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        crowded = browser.post(f"{base}/console/signout", timeout=30, allow_redirects=False,
                               data={"csrf": csrf, **{f"f{i}": "x" for i in range(150)}})
        assert crowded.status_code == 400 and "more than 100 fields" in crowded.text
        latin = browser.post(f"{base}/console/signout", timeout=30, allow_redirects=False,
                             data=f"csrf={csrf}&why=caf\xe9".encode("latin-1"), headers={
                                 "Content-Type": "application/x-www-form-urlencoded"})
        assert latin.status_code == 400 and "not UTF-8" in latin.text
        assert browser.get(f"{base}/console/config", timeout=30).status_code == 200

        # a removed user's session ends at once
        lungsys("users", "remove", "ada", "--config", str(https_node["toml"]))
        again = browser.get(f"{base}/console/config", timeout=30, allow_redirects=False)
        assert again.status_code == 303 and "/console/signin" in again.headers["location"]


def test_the_job_store_keeps_no_password_or_token(tmp_path):
    toml = tmp_path / "node.toml"
    toml.write_text(f'[store]\nurl = "sqlite:///{tmp_path / "db"}"\n')
    add_users(toml)
    token = lungsys("tokens", "create", "ct-1", "--config", str(toml))
    assert token.startswith("lsy_") and len(token) > 40
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("db*"))
    assert b"$argon2id$" in raw
    assert not any(pw.encode() in raw for pw in PASSWORDS.values())
    assert token.encode() not in raw
    listed = lungsys("users", "list", "--config", str(toml))
    assert [line.split()[:2] for line in listed.splitlines()[1:]] == [
        ["ada", "admin"], ["olga", "operator"], ["victor", "viewer"]]
    for args, stdin, message in [
            (["users", "add", "eve", "--role", "operator"], "short\n", "8 to 1024 characters"),
            (["users", "add", "olga", "--role", "viewer"], "long enough pw\n", "exists"),
            (["users", "add", "eve", "--role", "root"], "long enough pw\n", "--role"),
            (["users", "remove", "nobody"], "", "no user nobody"),
            (["tokens", "revoke", "nothing"], "", "no token labelled nothing")]:
        proc = subprocess.run([EXE, *args, "--config", str(toml)], input=stdin,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_a_password_guesser_is_slowed_per_name_and_cannot_pose_as_another_address(
        https_node):
    """Five wrong passwords for one name from one address make that address wait for that
    name (429), whatever X-Forwarded-For it claims; another user at the same address (a
    NAT, a Citrix farm) still signs in."""
    base, cafile = https_node["base"], https_node["cafile"]

    def attempt(name: str, password: str, forwarded: str = "") -> int:
        with requests.Session() as browser:
            browser.verify, browser.trust_env = cafile, False
            form = browser.get(f"{base}/console/signin", timeout=30).text
            nonce = form.split('name="nonce" value="')[1].split('"')[0]
            return browser.post(f"{base}/console/signin", timeout=30, allow_redirects=False,
                                headers={"X-Forwarded-For": forwarded} if forwarded else {},
                                data={"name": name, "password": password,
                                      "nonce": nonce}).status_code

    assert [attempt("olga", f"guess-{i}", f"10.9.8.{i}") for i in range(6)] == \
        [401] * 5 + [429]
    assert attempt("olga", PASSWORDS["olga"], "10.200.0.1") == 429     # still waiting
    assert attempt("victor", PASSWORDS["victor"]) == 303               # signed in


def test_hsts_is_sent_over_https_only_and_can_be_turned_off():
    """``[http] hsts_seconds``: it holds for the host name on every port, so an admin whose
    Orthanc Explorer runs on plain HTTP under the same name sets it to 0."""
    import asyncio

    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from pacs_node.web.app import make_app

    routes = [Route("/", lambda request: PlainTextResponse("ok"))]

    def hsts(seconds: int, scheme: str) -> bytes | None:
        sent: list = []
        scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
                 "query_string": b"", "headers": [], "scheme": scheme, "root_path": "",
                 "server": ("node", 443), "client": ("127.0.0.1", 1), "http_version": "1.1"}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(make_app(routes, hsts_seconds=seconds)(scope, receive, send))
        [start] = [m for m in sent if m["type"] == "http.response.start"]
        assert start["status"] == 200
        return dict(start["headers"]).get(b"strict-transport-security")

    assert hsts(60, "https") == b"max-age=60"
    assert hsts(60, "http") is None
    assert hsts(0, "https") is None
