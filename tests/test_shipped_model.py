"""The model that ships with lungsys: intact, labelled, and right on phantoms it never saw."""

from __future__ import annotations

import json

import numpy as np
import pytest

from inference.checkpoint import default_model, load_checkpoint
from inference.engine import Engine
from inference.profiles import CLASSES
from inference.series import load_series
from training.metrics import pointing_hit
from training.phantom import LABELS, generate_study

#: Phantom seeds of this test's patients: base seed 9 in phantom-set's scheme,
#: which the shipped model's training (base seeds 5 and 7) never used.
FRESH_SEEDS = range(90_000, 90_002)


def test_the_shipped_model_loads_verified_and_says_what_it_is():
    model = load_checkpoint(default_model())          # recomputes the weight hashes
    meta = model.metadata
    assert meta["profile"]["name"] == "small"
    assert "synthetic" in meta["intended_use"] and "not a clinical model" in meta["intended_use"]
    assert meta["provenance"]["kind"] == "trained"
    metrics = meta["metrics"]                          # recorded by 'lungsys evaluate --record'
    assert metrics["split"] == "all" and metrics["patients"] >= 100
    # the goals of issue 17 it meets on 100 fresh patients (the pointing game's 90% not yet)
    assert metrics["patient_accuracy"] >= 0.95
    assert metrics["infected_fraction_mae"] <= 0.02
    assert metrics["pointing_game"] >= 0.8


@pytest.fixture(scope="module")
def engine():
    return Engine(default_model(), device="cpu")


def test_the_shipped_model_diagnoses_and_localises_on_phantoms_it_never_saw(engine,
                                                                            tmp_path_factory):
    right, wrong, hits, flagged = 0, [], [], []
    for label in LABELS:
        for seed in FRESH_SEEDS:
            out = tmp_path_factory.mktemp(f"{label}-{seed}")
            generate_study(out, label, seed, slices=36)
            result = engine.analyze(load_series(out))
            expected = CLASSES[LABELS.index(label)]
            if result.diagnosis == expected:
                right += 1
            else:
                wrong.append(f"{label} seed {seed}: {result.diagnosis}")
            truth = json.loads((out / "truth.json").read_text())
            lesion = np.load(out / "masks.npz")["lesion"]
            row = {s["sop_instance_uid"]: i for i, s in enumerate(truth["slices"])}
            for s in result.slices:
                mask = lesion[row[s.sop_instance_uid]]
                if mask.any():
                    hits.append(pointing_hit(result.maps.on_grid(s.index), mask))
                    if s.has_lesion:                 # a region and a box shown to the reader
                        flagged.append(hits[-1])
    assert right >= 6, wrong    # 8 patients; a 90% model gets 6 or more right 96% of the time
    # the map's peak on a lesion: 87.8% of 1242 lesion slices of the 100 recorded patients,
    # 75% of these 6 patients' 81 (the attention map it replaced: under 5%)
    assert len(hits) > 30 and np.mean(hits) >= 0.6, (len(hits), np.mean(hits))
    # where it shows a lesion, the peak is on one: 54 of these 57 slices
    assert len(flagged) > 30 and np.mean(flagged) >= 0.85, (len(flagged), np.mean(flagged))
