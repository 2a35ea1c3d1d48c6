"""Screenshots of the operations console, for the README.

    .venv/bin/python scripts/console_screenshots.py --out docs/images

Starts ``lungsys serve`` (the shipped model) in a temporary folder with two
destinations, a private Orthanc on loopback and an archive that is down; adds
the console users; sends four phantom studies with DCMTK's storescu (COVID-19,
CAP, healthy, and one too short to analyse); waits until they are analysed and
delivered; signs in as an operator in headless Chromium and saves:

* ``console-dashboard.png``: the dashboard (node status, the last 24 hours'
  charts, recent errors);
* ``console-job.png``: the COVID-19 study's job page (diagnosis, probabilities,
  series, timings, the analysis log, result objects, deliveries with attempts).

Needs ``scripts/setup.sh --test`` (chromium, dcmtk, orthanc, playwright). Nothing is
downloaded; nothing leaves 127.0.0.1. Takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from PIL import Image  # noqa: E402

from console import EXE, add_users, launch, sign_in  # noqa: E402  (tests/console.py)
from orthanc import Orthanc, free_port  # noqa: E402  (tests/orthanc.py)

STUDIES = [("covid", 7, 48), ("cap", 3, 40), ("healthy", 5, 40), ("covid", 9, 6)]
MAX_BYTES = 400_000


def save_png(page, target: Path) -> None:
    raw = target.with_suffix(".raw.png")
    page.screenshot(path=str(raw), full_page=True)
    image = Image.open(raw).convert("RGB")
    raw.unlink()
    image.save(target, optimize=True)
    if target.stat().st_size > MAX_BYTES:
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                       dither=Image.Dither.NONE).save(target, optimize=True)
    print(f"{target}: {target.stat().st_size // 1024} KiB")


def wait(what: str, predicate, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"console_screenshots: {what} did not happen in {seconds:.0f} s")
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lungsys-console-") as tmp:
        tmp = Path(tmp)
        pacs = Orthanc(tmp / "orthanc").start()
        port, http = free_port(), free_port()
        toml = tmp / "node.toml"
        toml.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp / "var"}"\n'
            f'min_free_disk_mb = 1\n[http]\nport = {http}\n'
            f'[store]\nurl = "sqlite:///{tmp / "var" / "db"}"\n'
            f'[assembly]\nstable_seconds = 2\n[model]\ndevice = "cpu"\n'
            f'[delivery]\ninitial_backoff_seconds = 600\n'
            f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
            f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n'
            f'[[destinations]]\nname = "archive"\nkind = "dimse"\nae_title = "ARCHIVE"\n'
            f'host = "127.0.0.1"\nport = {free_port()}\n')
        add_users(toml)
        node = subprocess.Popen([EXE, "serve", "--config", str(toml)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            from store.api import JobStore

            store = JobStore(f"sqlite:///{tmp / 'var' / 'db'}")
            for label, seed, slices in STUDIES:
                folder = tmp / f"{label}-{seed}"
                subprocess.run([EXE, "phantom", "--out", str(folder), "--label", label,
                                "--seed", str(seed), "--slices", str(slices)], check=True,
                               capture_output=True)
                wait("the node's start", lambda: subprocess.run(
                    [EXE, "echo", "127.0.0.1", str(port), "--aet", "LUNGSYS"],
                    capture_output=True).returncode == 0, 120)
                subprocess.run(["storescu", "-aet", "CT1", "-aec", "LUNGSYS", "127.0.0.1",
                                str(port), *map(str, sorted(folder.glob("*.dcm")))],
                               check=True, capture_output=True,
                               env={**os.environ, "TCP_NODELAY": "1"})
            wait("three jobs done and delivered", lambda: len(
                [j for j in store.jobs("done")
                 if any(d.attempts for d in j.deliveries)]) == 3)
            wait("the short series skipped", lambda: store.series("skipped"))
            covid = min(j.id for j in store.jobs("done"))
            from playwright.sync_api import sync_playwright
            with sync_playwright() as p:
                browser = launch(p)
                page = sign_in(browser, f"http://127.0.0.1:{http}", "olga",
                               viewport=(1280, 800))
                save_png(page, args.out / "console-dashboard.png")
                page.goto(f"http://127.0.0.1:{http}/console/jobs/{covid}")
                save_png(page, args.out / "console-job.png")
                browser.close()
        finally:
            node.terminate()
            node.wait(60)
            pacs.stop()


if __name__ == "__main__":
    main()
