"""The dual-sampling attention network as a lungsys model: its online attention and
ensemble as the paper's equations, size-balanced sampling by the paper's rule, training
from the phantom's infection masks, its checkpoint (which names the architecture), and the
engine, SR and SEG from a volume model."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference import dualsampling as ds
from inference.checkpoint import LungSysModel, load_checkpoint, read_metadata
from training.train_volume import VolumeTrainConfig, size_groups, train_volume

from conftest import dciodvfy_errors


def test_attention_is_the_class_row_over_the_features_through_the_steep_sigmoid():
    """Eq. 1-2: A = ReLU(sum_c f_c w_kc) with the linear layer's row k of each volume's
    class, upsampled, over its maximum, sigmoid(100 (A - 0.4)); the row is not trained
    through the attention (Eq. 3 moves the features only)."""
    torch.manual_seed(0)
    branch = ds.AttentionResNet34(width=4, max_pool=False)
    x = torch.rand(2, 1, 16, 32, 32)
    _, f = branch(x)
    classes = torch.tensor([1, 3])
    a = branch.attention(f, classes)
    w = branch.fc.weight
    expected = torch.relu((f * w[classes][:, :, None, None, None]).sum(1))
    assert torch.allclose(a, expected, atol=1e-5)
    t = ds.soft_mask(a, (16, 32, 32))
    assert t.shape == (2, 16, 32, 32)
    assert t.flatten(1).amax(1).min() > 0.99           # the peak is A/max = 1
    assert float(t.detach().min()) < 0.01               # below 0.4 of the peak: near 0
    ds.attention_loss(t, torch.zeros_like(t)).backward()
    assert branch.fc.weight.grad is None and branch.layer4[0].conv1.weight.grad is not None


def test_the_ensemble_weighs_the_branches_by_the_infected_ratio():
    """Eq. 5: P = w P_US + (1 - w) P_SS with w = 0.96 for a ratio in [0.001, 0.030], 0.35
    outside; the ensembled map is weighed alike."""
    torch.manual_seed(1)
    net = ds.DualSamplingNet(LungSysModel.create("dualsampling-small").profile).eval()
    x = torch.rand(2, 1, 32, 64, 64)
    with torch.no_grad():
        out = net(x)
        pu = torch.softmax(net.us(x)[0], 1)
        ps = torch.softmax(net.ss(x)[0], 1)
    for i in range(2):
        inside = ds.RATIO_LOW <= float(out.ratio[i]) <= ds.RATIO_HIGH
        w = ds.W_US_INSIDE if inside else ds.W_US_OUTSIDE
        assert float(out.us_weight[i]) == pytest.approx(w)
        assert torch.allclose(out.probabilities[i], w * pu[i] + (1 - w) * ps[i], atol=1e-5)
    assert out.attention.shape == (2, 32, 64, 64)
    assert 0 <= float(out.attention.min()) and float(out.attention.max()) <= 1


def test_size_balanced_sampling_favours_the_rarer_infection_size_of_each_disease():
    """§III-C: COVID-19 small below 0.030, CAP large above 0.001; the rarer group of each
    weighs N_common / N_rare; Healthy, and H1N1 when all its studies are on one side of its
    median, weigh 2; a group is drawn by weight, then a study uniformly; an unknown ratio is
    never boosted."""
    labels = np.array([0] * 4 + [1] * 6 + [3] * 6)
    ratios = np.array([0] * 4 + [0.01, 0.01, 0.1, 0.1, 0.1, 0.1]       # 2 small, 4 large
                      + [0.0005] * 4 + [0.01] * 2)                      # 4 small, 2 large
    p = size_groups(labels, ratios)
    assert p.sum() == pytest.approx(1)
    # groups: healthy 2, covid small 2, covid large 1, cap small 1, cap large 2 (sum 8)
    assert p[:4] == pytest.approx([2 / 8 / 4] * 4)
    assert p[4:6] == pytest.approx([2 / 8 / 2] * 2) and p[6:10] == pytest.approx([1 / 8 / 4] * 4)
    assert p[10:14] == pytest.approx([1 / 8 / 4] * 4) and p[14:] == pytest.approx([2 / 8 / 2] * 2)
    unknown = ratios.copy()
    unknown[4] = -1.0              # one small COVID-19 study's ratio unknown: counted large
    q = size_groups(labels, unknown)
    # covid small {5} weighs 5/1, covid large {4, 6..9} 1; healthy 2, cap 1 and 2: sum 11
    assert q[5] == pytest.approx(5 / 11) and q[4] == pytest.approx(1 / 11 / 5) == q[6]


def test_the_volume_is_the_lungs_box_over_all_slices(study_factory):
    from inference.series import load_series

    series = load_series(study_factory("covid", 3, 24).directory)
    prepared = ds.prepare_volume(series.hu, (16, 48, 48))
    lung = prepared.source_lung
    r0, c0, r1, c1 = prepared.box
    rows, cols = np.flatnonzero(lung.any(axis=(0, 2))), np.flatnonzero(lung.any(axis=(0, 1)))
    assert r0 <= rows[0] and r1 > rows[-1] and c0 <= cols[0] and c1 > cols[-1]
    assert prepared.volume.shape == (16, 48, 48) and 0 <= prepared.volume.min()
    assert prepared.volume.max() <= 1
    depth = prepared.depth_of(len(series))
    z0, z1 = prepared.z
    assert (depth[:z0] == -1).all() and (depth[z1:] == -1).all()
    assert (np.diff(depth[z0:z1]) >= 0).all() and depth[z0] == 0 and depth[z1 - 1] == 15


def test_dualsampling_trains_round_trips_and_writes_results(tiny, tmp_path, study_factory):
    """A few epochs on the tiny phantom set: both losses recorded, the attention learnt
    from the masks; the checkpoint names the architecture and holds no patient network;
    the engine gives the patient's probabilities and each slice's map from its depth; SR
    and SEG pass dciodvfy."""
    from inference.engine import Engine
    from inference.export import write_results
    from inference.series import load_series

    out = tmp_path / "ds.safetensors"
    meta = train_volume(VolumeTrainConfig(data=str(tiny), out=str(out), epochs=3, lr=2e-3,
                                          batch_size=4, device="cpu"))
    with (tmp_path / "ds.run" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(float(r["attention_loss"]) > 0 for r in rows)
    assert float(rows[-1]["attention_loss"]) < float(rows[0]["attention_loss"])
    assert 1 <= meta["provenance"]["kept_epoch"] <= 3
    assert read_metadata(out)["profile"]["arch"] == "dualsampling"
    model = load_checkpoint(out)
    assert model.patient_net is None and model.version.startswith("dualsampling-small-")
    assert all(k.startswith("volume.") for k in model.state_dict())
    assert model.content_sha256 == meta["content_sha256"]

    series = load_series(study_factory("cap", 2, 24).directory)
    result = Engine(model, device="cpu").analyze(series)
    assert result.model.profile == "dualsampling-small" and len(result.slices) == 24
    assert result.probabilities.sum() == pytest.approx(1)
    for s in result.slices:       # a volume model's slices carry the patient's classes
        assert np.allclose(s.class_probabilities, result.network_probabilities)
        assert s.lesion_probability <= 1 - result.network_probabilities[0] + 1e-6
    files = write_results(result, series, tmp_path / "results")
    assert dciodvfy_errors(files.sr) == []
    import pydicom

    sr = pydicom.dcmread(files.sr)        # the SR names the architecture, not M3
    assert "Dual-sampling attention network (dualsampling-small profile)" in \
        [e.ManufacturerModelName for e in sr.ContributingEquipmentSequence]
    texts = [str(e.value) for e in sr.iterall() if e.keyword == "TextValue"]
    assert any("Produced by lungsys Dual-sampling attention network dualsampling-small-" in t
               for t in texts)
    assert "volume window=-1350,150" in texts
    if files.seg is not None:
        assert dciodvfy_errors(files.seg) == []


def test_the_slice_commands_refuse_a_volume_model_and_say_which_to_use(tiny, tmp_path):
    exe = str(Path(sys.executable).with_name("lungsys"))
    proc = subprocess.run([exe, "train", "slice", "--arch", "dualsampling", "--data", str(tiny),
                           "--out", str(tmp_path / "s.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "dualsampling is a volume model: lungsys train volume" in proc.stderr
    proc = subprocess.run([exe, "model", "init", "--arch", "dualsampling",
                           "--out", str(tmp_path / "v.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "profile dualsampling-small" in proc.stdout, proc.stderr
    proc = subprocess.run([exe, "train", "patient", "--data", str(tiny), "--slice-model",
                           str(tmp_path / "v.safetensors"), "--out",
                           str(tmp_path / "p.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is a volume model (dualsampling)" in proc.stderr


def test_resampling_keeps_the_mean_and_a_small_lesion():
    """In-plane antialiasing, 64 slices at a time, and area averaging along the slices: a
    constant stays constant, a 150-slice block's mean is kept, and a lesion 6 voxels wide
    in a 300 x 300 plane still marks the 64 x 64 infection mask."""
    block = np.random.default_rng(0).normal(size=(150, 90, 110)).astype(np.float32)
    out = ds._resample(block, (32, 64, 64))
    assert out.shape == (32, 64, 64) and abs(out.mean() - block.mean()) < 0.01
    assert np.allclose(ds._resample(np.full((150, 90, 110), 7.0), (32, 64, 64)), 7.0)
    mask = np.zeros((40, 300, 300), dtype=bool)
    mask[18:24, 100:106, 200:206] = True
    prepared = ds.PreparedVolume(np.zeros((32, 64, 64)), np.ones((32, 64, 64), bool),
                                 (0, 0, 300, 300), (0, 40), np.ones((40, 300, 300), bool))
    resampled = ds.resample_mask(mask, prepared)
    assert resampled.any() and resampled.sum() < 20


def test_the_infection_mask_lies_on_the_lesions_of_the_volume(study_factory, tmp_path):
    """The cached volume's infection mask is the phantom's lesion mask in the volume's
    place: inside it the CT is denser than the lung around it (lesions raise attenuation),
    and its share of the lungs is near the truth's infected fraction."""
    import json

    from training.cache import load_volume
    from training.dataset import StudyEntry

    study = study_factory("cap", 5, 40)
    folder = study.directory
    entry = StudyEntry(folder, 3, "train", folder / "truth.json", folder / "masks.npz", 2)
    cached = load_volume(entry, (32, 64, 64), tmp_path)
    assert cached.infection is not None and cached.infection.any()
    inside = cached.volume[cached.infection].astype(np.float32).mean()
    around = cached.volume[cached.lung & ~cached.infection].astype(np.float32).mean()
    assert inside > around + 0.1
    truth = json.loads((folder / "truth.json").read_text())["infected_fraction"]
    assert cached.ratio == pytest.approx(truth)
    share = cached.infection.sum() / (cached.lung | cached.infection).sum()
    assert share == pytest.approx(truth, abs=0.05)
    again = load_volume(entry, (32, 64, 64), tmp_path)          # from the cache
    assert np.array_equal(again.infection, cached.infection)


def test_each_slice_shows_the_attention_of_its_depth(study_factory):
    """The engine's map of a slice is the ensembled attention at the slice's depth; slices
    beyond the lungs' first and last have none."""
    from inference.engine import Engine
    from inference.series import load_series

    series = load_series(study_factory("covid", 1, 24).directory)
    model = LungSysModel.create("dualsampling-small", seed=3)
    result = Engine(model, device="cpu").analyze(series)
    prepared = ds.prepare_volume(series.hu, ds.volume_shape(model.profile))
    with torch.no_grad():
        out = model.eval().slice_net(torch.from_numpy(prepared.volume)[None, None],
                                     torch.from_numpy(prepared.lung)[None])
    depth = prepared.depth_of(len(series))
    attention = out.attention[0].numpy()
    for s in result.slices:
        shown = result.maps.maps[s.index]
        if depth[s.index] < 0:
            assert shown.max() == 0 and s.lesion_probability == 0
        else:
            expected = attention[depth[s.index]]
            scale = s.lesion_probability / expected.max()
            assert np.allclose(shown, expected * scale, atol=1e-5)


def test_an_interrupted_volume_training_resumes_and_never_keeps_an_older_best(tiny, tmp_path):
    out = tmp_path / "ds.safetensors"
    cfg = dict(data=str(tiny), out=str(out), lr=2e-3, batch_size=4, device="cpu")
    train_volume(VolumeTrainConfig(epochs=1, **cfg))
    first = load_checkpoint(out).content_sha256
    meta = train_volume(VolumeTrainConfig(epochs=2, **cfg))       # resumes after epoch 1
    with (tmp_path / "ds.run" / "metrics.csv").open() as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    assert "resuming the run" in (tmp_path / "ds.run" / "train.log").read_text()
    assert meta["provenance"]["kept_epoch"] in (1, 2)
    # a new run in the same folder (its resume state removed) forgets the old best epoch,
    # even one no epoch of the new run can beat
    from safetensors.torch import load_file, save_file

    best = tmp_path / "ds.run" / "best.safetensors"
    save_file(load_file(str(best)), str(best), metadata={"epoch": "2", "val_acc": "1.0"})
    (tmp_path / "ds.run" / "resume.safetensors").unlink()
    again = train_volume(VolumeTrainConfig(epochs=1, **cfg))
    assert again["provenance"]["kept_epoch"] == 1
    assert again["content_sha256"] == first       # epoch 1 again, not the older run's best
