"""Checkpoints: safetensors + JSON metadata, bit-exact round trip, refusals."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from inference.checkpoint import (CheckpointError, LungSysModel, load_checkpoint, read_metadata,
                                  save_checkpoint)
from inference.profiles import CLASSES


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.safetensors"
    model = LungSysModel.create("small", seed=4)
    with torch.no_grad():  # non-trivial buffers too
        model.slice_net.backbone.bn1.running_mean.uniform_()
    save_checkpoint(model, path)
    return model, path


def test_round_trip_is_bit_exact(saved):
    model, path = saved
    loaded = load_checkpoint(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    meta = loaded.metadata
    assert meta["classes"] == list(CLASSES)
    assert meta["profile"]["name"] == "small"
    assert meta["preprocessing"]["window_width"] == 1200.0
    assert meta["preprocessing"]["inference_centres"] == [-700.0, -600.0, -500.0]
    assert meta["provenance"] == {"kind": "init", "seed": 4}
    assert meta["content_sha256"] == loaded.content_sha256
    assert meta["model_version"].startswith("small-")
    assert loaded.device_uid == model.device_uid and meta["device_uid"] == loaded.device_uid


def test_same_seed_same_weights_other_seed_other_uid(tmp_path):
    a = LungSysModel.create("small", seed=9)
    b = LungSysModel.create("small", seed=9)
    c = LungSysModel.create("small", seed=10)
    assert a.content_sha256 == b.content_sha256
    assert a.device_uid != c.device_uid


def _header(path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)


def test_a_missing_file_or_a_folder_is_named_as_such(tmp_path):
    for path, words in ((tmp_path / "none.safetensors", "no such checkpoint file"),
                        (tmp_path, "a folder, not a checkpoint file")):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert str(err.value) == f"{path}: {words}" + (" (.safetensors)" if path == tmp_path
                                                       else "")


def test_altered_weights_are_refused(saved, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF                                  # flip bits in the last tensor
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "SHA-256" in str(err.value)


def _rewrite_metadata(path, dest, edit):
    n, header, data = _header(path)
    meta = json.loads(header["__metadata__"]["lungsys"])
    edit(meta)
    header["__metadata__"]["lungsys"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dest.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    return meta


def test_altered_metadata_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "meta.safetensors"
    _rewrite_metadata(path, bad, lambda m: m.__setitem__("metrics", {"accuracy": 0.99}))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "integrity" in str(err.value)


def test_weights_that_do_not_fit_the_profile_are_refused(saved, tmp_path):
    from inference.checkpoint import _integrity

    _, path = saved
    bad = tmp_path / "mismatch.safetensors"

    def forge(meta):  # a consistent-looking file whose profile says "paper"
        meta["profile"]["width"] = 64
        meta["integrity"] = _integrity(meta["content_sha256"], meta)
    _rewrite_metadata(path, bad, forge)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "do not fit profile" in str(err.value)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello")
    with pytest.raises(CheckpointError):
        read_metadata(junk)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "missing.safetensors")
    assert "no such checkpoint" in str(err.value)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(other)
    assert "not a lungsys checkpoint" in str(err.value)
