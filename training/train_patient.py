"""Patient-level training (paper IV-A) on frozen slice features.

The slice network of a checkpoint is frozen; every study's slice features
(three window centres averaged, as at inference) are extracted once and
cached. The patient network then learns from variable-length patients in
padded batches: SGD, lr 0.001 x0.1 every 30 epochs, 90 epochs by default.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.checkpoint import load_checkpoint
from inference.engine import run_slices
from training.cache import load_study
from training.dataset import StudyEntry, intended_use, read_manifest
from training.runs import Epochs, make_optimizer, open_run, write_trained
from training.settings import PatientTrainConfig, check_patient_settings


def study_features(model, entry: StudyEntry, cache_dir: Path, device, batch_size: int = 32
                   ) -> np.ndarray:
    """(slices, D) features of a study under a model's frozen slice network, cached."""
    key = model.metadata.get("content_sha256") or model.content_sha256
    # the features of the engine's views: the slice and its mirror image, on the model's crop
    path = Path(cache_dir) / f"features-{key[:16]}-{model.profile.crop}-mirrored" \
        / f"{entry.path.name}.npy"
    study = load_study(entry, model.profile.input_size, cache_dir, model.profile.crop)
    if path.is_file():
        feats = np.load(path, allow_pickle=False)
        if feats.shape[0] == len(study):
            return feats
    feats = run_slices(model.slice_net, study.crops, batch_size, device).features
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, feats)
    return feats


def _batch(features: list[np.ndarray], rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = [features[r].shape[0] for r in rows]
    out = np.zeros((len(rows), max(lengths), features[rows[0]].shape[1]), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, :lengths[i]] = features[r]
    return torch.from_numpy(out), torch.tensor(lengths)


def train_patient(cfg: PatientTrainConfig, progress=None) -> dict:
    check_patient_settings(cfg)
    run, device, cache_dir = open_run(cfg)
    model = load_checkpoint(cfg.slice_model, device)
    slice_provenance = model.metadata.get("provenance")
    entries = {split: read_manifest(cfg.data, split) for split in ("train", "val")}
    if not entries["train"]:
        raise ValueError("no training studies in the manifest")
    feats: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    task = progress.add_task("slice features", total=sum(map(len, entries.values()))) \
        if progress is not None else None
    for split, items in entries.items():
        feats[split] = []
        for e in items:
            feats[split].append(study_features(model, e, cache_dir, device))
            if task is not None:
                progress.advance(task)
        labels[split] = np.array([e.label for e in items])

    torch.manual_seed(cfg.seed)
    net = model.patient_net.to(device)
    optimizer = make_optimizer(cfg, net)
    epochs = Epochs(run, cfg, net, optimizer, progress)
    epoch_task = progress.add_task("patient training", total=cfg.epochs,
                                   completed=epochs.finished) if progress is not None else None
    started = time.time()
    n = len(feats["train"])
    with epochs:
        for epoch, lr, rng in epochs:
            order = rng.permutation(n)
            net.train()
            total, seen = 0.0, 0
            for b in range(0, n, cfg.batch_size):
                rows = order[b:b + cfg.batch_size]
                x, lengths = _batch(feats["train"], rows)
                y = torch.from_numpy(labels["train"][rows]).to(device)
                loss = F.cross_entropy(net(x.to(device), lengths), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                optimizer.step()
                total += loss.item() * len(rows)
                seen += len(rows)
            row = {"epoch": epoch + 1, "lr": lr, "loss": round(total / seen, 5)}
            if feats["val"]:
                row["val_acc"] = round(patient_accuracy(net, feats["val"], labels["val"],
                                                        device), 4)
            epochs.done(row)
            if epoch_task is not None:
                progress.update(epoch_task, advance=1,
                                description=f"patient training loss {row['loss']:.3f}")
    model.metadata["intended_use"] = intended_use(read_manifest(cfg.data, "train"))
    return write_trained(model, {
        "kind": "trained", "slice": slice_provenance,
        "patient": {"data": str(Path(cfg.data).resolve()), "epochs": cfg.epochs, "lr": cfg.lr,
                    "seed": cfg.seed, "train_patients": n,
                    "seconds": round(time.time() - started, 1), "run_dir": str(run.dir)}},
        cfg.out)


@torch.no_grad()
def patient_accuracy(net, feats: list[np.ndarray], labels: np.ndarray, device) -> float:
    net.eval()
    correct = 0
    for i, f in enumerate(feats):
        logits = net(torch.from_numpy(f)[None].to(device))
        correct += int(logits.argmax(1).item() == labels[i])
    return correct / len(feats)
