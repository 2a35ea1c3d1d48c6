"""Test and screenshot helpers for the console: a ``lungsys serve`` with users, and
Debian's Chromium driven by Playwright (its bundled driver only; no browser is
downloaded: ``executable_path`` points at ``/usr/bin/chromium``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

EXE = str(Path(sys.executable).with_name("lungsys"))
PASSWORDS = {"olga": "olga-operator-pw", "victor": "victor-viewer-pw",
             "ada": "ada-admin-password"}
ROLES = {"olga": "operator", "victor": "viewer", "ada": "admin"}


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def lungsys(*args: str, stdin: str = "") -> str:
    proc = subprocess.run([EXE, *args], input=stdin, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


def add_users(toml: Path) -> None:
    """The three console users, as an admin adds them (``lungsys users add``)."""
    for name, password in PASSWORDS.items():
        lungsys("users", "add", name, "--role", ROLES[name], "--config", str(toml),
                stdin=password + "\n")


def http_status(url: str, token: str = "", cafile: str | None = None) -> int:
    import ssl

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def sign_in(browser, base: str, name: str, viewport=(1280, 900)):
    """A new browser context signed in as ``name``; its page on the dashboard."""
    context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                  ignore_https_errors=False)
    page = context.new_page()
    page.goto(f"{base}/console/")
    assert "/console/signin" in page.url           # not signed in: the sign-in page
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", PASSWORDS[name])
    page.click("form.signin button[type=submit]")
    page.wait_for_url(f"{base}/console/")
    assert page.inner_text("#whoami") == f"{name} ({ROLES[name]})"
    return page


def launch(playwright):
    return playwright.chromium.launch(executable_path=chromium(),
                                      args=["--no-sandbox", "--disable-gpu"])
