"""Study mode: one result per study. A study of a thin lung-kernel series, a thick
soft-tissue series and a localizer gets one SR, on the thin lung series; the others are
skipped with the reason; ``lungsys rules test`` shows the same choice before sending."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from conftest import eventually, require_tool
from orthanc import Orthanc, free_port

EXE = str(Path(sys.executable).with_name("lungsys"))


def variant(files, folder: Path, **attributes) -> tuple[str, list[Path]]:
    """The study's CT images as another series of it (new UIDs, these attributes)."""
    folder.mkdir()
    series_uid = generate_uid()
    out = []
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / f.name)
        out.append(folder / f.name)
    return series_uid, out


def test_a_study_of_three_series_gets_one_sr_on_the_thin_lung_series(tmp_path, study_factory):
    from config import load_config
    from inference.engine import Engine
    from pacs_node.node import Node
    from doubles import hotspot_model

    study = study_factory("covid", 41, 24)
    sent = tmp_path / "study"
    sent.mkdir()
    thin, thin_files = variant(study.files, sent / "thin", SliceThickness=1.0,
                               ConvolutionKernel="LUNG", SeriesDescription="Lung 1 mm")
    thick, thick_files = variant(study.files, sent / "thick", SliceThickness=5.0,
                                 ConvolutionKernel="STANDARD", SeriesDescription="Soft 5 mm")
    scout, scout_files = variant(study.files[:1], sent / "scout", SeriesDescription="Topogram",
                                 ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    pacs = Orthanc(tmp_path / "orthanc").start()
    toml = tmp_path / "node.toml"
    toml.write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {free_port()}\ndata_dir = "{tmp_path / "var"}"\n'
        f'min_free_disk_mb = 1\n[http]\nport = 0\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "var" / "db"}"\n'
        f'[assembly]\ntrigger = "study"\nstudy_stable_seconds = 3\n'
        f'[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
        f'host = "127.0.0.1"\nport = {pacs.dicom_port}\n')

    # the rule tester says what the node will do
    proc = subprocess.run([EXE, "rules", "test", str(sent), "--config", str(toml), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    verdicts = {r["series_instance_uid"]: (r["verdict"], r["why"])
                for r in json.loads(proc.stdout)}
    assert verdicts[thin] == ("analysed", "the rule's choice")
    assert verdicts[thick] == ("skipped", f"another series of the study was analysed: {thin}")
    assert scout not in verdicts          # a localizer is not a CT image series to choose

    node = Node(load_config(toml, environ={}), Engine(hotspot_model(), device="cpu"))
    node.start()
    try:
        for files in (scout_files, thick_files, thin_files):        # as a scanner sends
            proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                                   "127.0.0.1", str(node.port), *map(str, files)],
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "TCP_NODELAY": "1"})
            assert proc.returncode == 0, proc.stderr
        job = eventually(lambda: [j for j in node.store.jobs("done")
                                  if j.deliveries and j.deliveries[0].attempts], timeout=180)[0]
        assert job.series.series_instance_uid == thin
        states = {s.series_instance_uid: (s.state.value, s.reason) for s in node.store.series()}
        assert states[thick] == ("skipped", f"another series of the study was analysed: {thin}")
        assert states[scout] == ("skipped", "localizer (scout) image")
        assert len(node.store.jobs()) == 1
        srs = [i for s in pacs.get("/series") for i in pacs.get(f"/series/{s}")["Instances"]
               if pacs.get(f"/series/{s}")["MainDicomTags"].get("Modality") == "SR"]
        assert len(srs) == 1
        with urllib.request.urlopen(f"{pacs.url}/instances/{srs[0]}/file", timeout=30) as r:
            sr = pydicom.dcmread(BytesIO(r.read()))
        evidence = {s.SeriesInstanceUID
                    for study_ref in sr.CurrentRequestedProcedureEvidenceSequence
                    for s in study_ref.ReferencedSeriesSequence}
        assert thin in evidence and thick not in evidence and scout not in evidence

        # a series of the study sent later makes no second result
        late, late_files = variant(study.files, sent / "late", SliceThickness=0.6,
                                   ConvolutionKernel="LUNG")
        proc = subprocess.run([require_tool("storescu"), "-aet", "CT1", "-aec", "LUNGSYS",
                               "127.0.0.1", str(node.port), *map(str, late_files)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TCP_NODELAY": "1"})
        assert proc.returncode == 0, proc.stderr
        eventually(lambda: {s.series_instance_uid: s.state.value for s in node.store.series()}
                   .get(late) == "skipped", timeout=60)
        [later] = [s for s in node.store.series() if s.series_instance_uid == late]
        assert later.reason == f"another series of the study was analysed: {thin}"
        assert len(node.store.jobs()) == 1
    finally:
        node.stop()
        pacs.stop()


def test_the_rule_takes_thinnest_then_a_lung_kernel_then_most_slices():
    from pacs_node.choice import Candidate, choose

    def c(uid, slices, thickness, kernel, reason=None):
        return Candidate(uid, uid, slices, thickness, kernel, reason)

    series = [c("scout", 1, None, "", "localizer (scout) image"),
              c("soft", 300, 1.0, "B30f"), c("lung-few", 200, 1.0, "B70f"),
              c("lung-many", 250, 1.0, "LUNG"), c("thick-lung", 60, 5.0, "LUNG")]
    chosen, others = choose(series)
    assert chosen.key == "lung-many"
    assert dict((o.key, why) for o, why in others) == {
        "scout": "localizer (scout) image",
        **{k: "another series of the study was analysed: lung-many"
           for k in ("soft", "lung-few", "thick-lung")}}
    assert choose([c("no-thickness", 300, None, "LUNG"), c("thin", 20, 0.6, "B30f")])[0].key \
        == "thin"
    assert choose([series[0]])[0] is None               # nothing eligible: nothing analysed
