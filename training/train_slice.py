"""Slice-level training (paper IV-A): both tasks' losses, the paper's schedule.

Every slice of the train split is a sample, labelled lesion/no lesion (task
1) and with its patient's class (task 2); slices of diseased patients without
lesions are dropped (kept for patient training and evaluation). Each sample
gets a random window centre in [-700, -500] and random flips. SGD with
momentum, lr 0.01 x0.1 every 40 epochs, 110 epochs by default; every
hyper-parameter is a setting. Switches: the class-balanced focal loss (Hu
2020), infection-size-balanced sampling (dual-sampling paper), and small
random rotations, scalings and shifts (not in the paper; they help most when
there are few patients and no ImageNet weights). Hu 2020's own schedule is
made of settings too: Adam with its betas, each level's classifier trained
on its own before the joint one (``level_epochs``), and early stopping on the
validation loss that writes the epoch of the best validation accuracy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from inference.checkpoint import load_backbone_weights, load_checkpoint, LungSysModel
from inference.hu2020 import lesion_of
from inference.preprocess import TRAINING_CENTRE_RANGE, WINDOW_WIDTH
from inference.profiles import CLASSES
from training.cache import CachedStudy, load_study
from training.dataset import read_manifest
from training.losses import (HU2020_GAMMA, class_balanced_weights, focal_loss,
                             inverse_frequency_weights)
from training.runs import BestEpoch, Epochs, make_optimizer, open_run, write_trained
from training.settings import SliceTrainConfig, checked_slice_profile

#: Infection-size bins for balanced sampling: lesion fraction of the slice's lung.
SIZE_BINS = (0.0, 0.02, 0.1, 0.3)
#: Ranges of the ``affine`` augmentation: degrees, scale factor, shift (fraction of the side).
ROTATION_DEG, SCALE, SHIFT = 12.0, (0.9, 1.1), 0.06


def random_affine(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Rotate, scale and shift each image of (n, c, h, w) by a small random amount.

    Bilinear resampling; what comes in from outside the crop repeats its edge
    (body wall or air, as at the crop's border).
    """
    n = x.shape[0]
    angle = np.deg2rad(rng.uniform(-ROTATION_DEG, ROTATION_DEG, n))
    scale = rng.uniform(*SCALE, n)
    shift = rng.uniform(-SHIFT, SHIFT, (n, 2)) * 2  # affine_grid spans [-1, 1]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta = np.stack([np.stack([cos, -sin, shift[:, 0]], 1),
                      np.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(torch.from_numpy(theta).to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class SliceSet:
    """Training slices: where each comes from and its two labels."""

    studies: list[CachedStudy]
    index: np.ndarray      # (n, 2): study, slice
    lesion: np.ndarray     # (n,) 0/1
    label: np.ndarray      # (n,) class
    fraction: np.ndarray   # (n,) lesion fraction (0 for no lesion)
    types: np.ndarray      # (n, 5) LA-DNN's lesion types: 1, 0, or -1 unknown
    #: diseased studies left out: not every slice's lesion flag is known
    left_out: int = 0

    def __len__(self) -> int:
        return len(self.lesion)

    def batch(self, rows: np.ndarray, rng: np.random.Generator, flips: str,
              train: bool = True, affine: bool = False) -> torch.Tensor:
        crops = np.stack([self.studies[s].crops[i] for s, i in self.index[rows]]).astype(
            np.float32)
        if train:
            centres = rng.uniform(*TRAINING_CENTRE_RANGE, size=(len(rows), 1, 1))
        else:
            centres = np.full((len(rows), 1, 1), -600.0)
        x = np.clip((crops - (centres - WINDOW_WIDTH / 2)) / WINDOW_WIDTH, 0, 1)
        if train and flips in ("horizontal", "both"):
            flip = rng.random(len(rows)) < 0.5
            x[flip] = x[flip, :, ::-1]
        if train and flips == "both":
            flip = rng.random(len(rows)) < 0.5
            x[flip] = x[flip, ::-1, :]
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
        if train and affine:
            x = random_affine(x, rng)
        return x.repeat(1, 3, 1, 1)


def build_slice_set(studies: list[CachedStudy], drop_lesion_free_diseased: bool = True,
                    validation: bool = False) -> SliceSet | None:
    """The slices to train on (or validate with). A diseased study without every slice's
    lesion flag (the manifest's annotations) is left out and counted: its lesion-free
    slices cannot be told from its lesion slices. A ``validation`` set may be left with
    none (None), a training set not (ValueError)."""
    index, lesion, label, fraction, types = [], [], [], [], []
    left_out = 0
    for s, study in enumerate(studies):
        cls = study.entry.label
        if cls != 0 and (study.has_lesion < 0).any():
            left_out += 1
            continue
        for i in range(len(study)):
            has = int(study.has_lesion[i]) if cls != 0 else 0
            if cls != 0 and not has and drop_lesion_free_diseased:
                continue
            index.append((s, i))
            lesion.append(has)
            label.append(cls)
            fraction.append(max(float(study.lesion_fraction[i]), 0.0) if has else 0.0)
            types.append(study.lesion_types[i] if cls != 0 else np.zeros(5, np.int8))
    if left_out and left_out == sum(study.entry.label != 0 for study in studies) \
            and not validation:
        raise ValueError(f"slice training needs per-slice lesion annotations for diseased "
                         f"patients (the manifest's annotations): none of the {left_out} has "
                         f"them")
    if not index:
        if validation:
            return None
        raise ValueError("no training slices")
    return SliceSet(studies, np.array(index), np.array(lesion), np.array(label),
                    np.array(fraction, dtype=np.float32), np.array(types, dtype=np.int8),
                    left_out)


def _tell_left_out(run, train: SliceSet, val: SliceSet | None, progress) -> None:
    """Say which diseased studies slice training leaves out, and a class it then never
    learns (its studies all unannotated)."""
    for name, split in (("training", train), ("validation", val)):
        n = split.left_out if split is not None else 0
        if n:
            run.tell(f"{n} diseased {name} {'study' if n == 1 else 'studies'} without every "
                     f"slice's lesion annotation {'is' if n == 1 else 'are'} left out of "
                     f"slice training", progress)
    present = {study.entry.label for study in train.studies}
    lacking = [CLASSES[k] for k in sorted(present - {0}) if not (train.label == k).any()]
    if lacking:
        run.tell(f"the training split has no {', '.join(lacking)} study with lesion "
                 f"annotations: the slice network does not learn "
                 f"{'it' if len(lacking) == 1 else 'them'}", progress)


def size_balanced_weights(fraction: np.ndarray) -> np.ndarray:
    """Sampling weights that give every infection-size bin the same share."""
    bins = np.digitize(fraction, SIZE_BINS[1:], right=True)
    bins[fraction == 0] = -1
    weights = np.zeros(len(fraction))
    present = np.unique(bins)
    for b in present:
        members = bins == b
        weights[members] = 1.0 / members.sum() / len(present)
    return weights / weights.sum()


def load_split(data: str, split: str, size: int, cache_dir: Path,
               progress: Callable[[], None] | None = None,
               crop: str = "lungs") -> list[CachedStudy]:
    studies = []
    for entry in read_manifest(data, split):
        studies.append(load_study(entry, size, cache_dir, crop))
        if progress is not None:
            progress()
    return studies


def train_slice(cfg: SliceTrainConfig, progress=None) -> dict:
    """Train the slice network; writes the checkpoint and returns its metadata.

    ``progress`` is a rich Progress (or None).
    """
    profile, start = checked_slice_profile(cfg)
    crop = profile.crop
    run, device, cache_dir = open_run(cfg)
    torch.manual_seed(cfg.seed)
    model = LungSysModel.create(profile, cfg.seed)
    if cfg.backbone_weights:
        load_backbone_weights(model, cfg.backbone_weights)
    if cfg.from_model:
        start_from(model, cfg.from_model)
        run.tell(f"starting from {start.get('model_version')} (crop "
                 f"{start.get('profile', {}).get('crop', 'lungs')}), trained on the {crop} "
                 f"crop", progress)
    net = model.slice_net.to(device)

    def task(name: str, total: int, done: int = 0):
        return progress.add_task(name, total=total, completed=done) \
            if progress is not None else None

    def advance(t, **kw):
        if progress is not None and t is not None:
            progress.update(t, advance=1, **kw)

    entries = read_manifest(cfg.data, "train")
    t = task("caching train slices", len(entries))
    train = build_slice_set(load_split(cfg.data, "train", profile.input_size, cache_dir,
                                       lambda: advance(t), profile.crop))
    val_studies = load_split(cfg.data, "val", profile.input_size, cache_dir,
                             crop=profile.crop)
    val = build_slice_set(val_studies, validation=True) if val_studies else None
    _tell_left_out(run, train, val, progress)
    if val is not None and not (val.label != 0).any():
        run.tell("the validation split has no diseased study with lesion annotations: no "
                 "validation accuracy chooses the epochs", progress)
        val = None
    run.log.info(f"{len(train)} training slices, {len(val) if val else 0} validation slices")
    if cfg.early_stop and val is None:
        raise ValueError("--early-stop follows the validation loss: the dataset has no "
                         "validation split (or no diseased study with lesion annotations "
                         "in it)")

    optimizer = make_optimizer(cfg, net)
    epochs = Epochs(run, cfg, net, optimizer, progress)
    best = BestEpoch(run, fresh=epochs.finished == 0) if cfg.early_stop else None
    # the focal loss: Hu 2020's own (inverse frequencies, gamma 1) for its network
    weigh, gamma = (inverse_frequency_weights, HU2020_GAMMA) if profile.arch == "hu2020" \
        else (class_balanced_weights, 2.0)
    lesion_w = weigh(np.bincount(train.lesion, minlength=2))
    class_w = weigh(np.bincount(train.label, minlength=4))

    def loss(logits, target, weights):
        return focal_loss(logits, target, weights, gamma) if cfg.focal \
            else F.cross_entropy(logits, target)

    sampling = size_balanced_weights(train.fraction) if cfg.size_balanced else None
    steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    epoch_task = task("slice training", cfg.epochs, epochs.finished)
    started = time.time()
    with epochs:
        for epoch, lr, rng in epochs:
            alone = epoch < cfg.level_epochs        # Hu 2020's first phase
            if epoch == cfg.level_epochs > 0:
                run.tell(f"epoch {epoch + 1}: each level's classifier trained, now the joint "
                         f"one (Hu 2020's second phase)", progress)
            order = (rng.choice(len(train), size=len(train), p=sampling)
                     if sampling is not None else rng.permutation(len(train)))
            net.train()
            totals = np.zeros(3)
            seen = 0
            t0 = time.time()
            batch_task = task(f"epoch {epoch + 1}", steps)
            for b in range(steps):
                rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                if len(rows) < 2:
                    continue  # batch norm needs two samples
                x = train.batch(rows, rng, cfg.flips, affine=cfg.affine).to(device)
                lesion = torch.from_numpy(train.lesion[rows]).to(device)
                label = torch.from_numpy(train.label[rows]).to(device)
                out = net(x)
                l1, l2 = task_losses(out, lesion, label, lambda y, t: loss(y, t, lesion_w),
                                     lambda y, t: loss(y, t, class_w), alone)
                l3 = type_loss(out.lesion_type_logits, train.types[rows], device)
                optimizer.zero_grad(set_to_none=True)
                (l1 + l2 + l3).backward()
                optimizer.step()
                totals += [l1.item() * len(rows), l2.item() * len(rows), l3.item() * len(rows)]
                seen += len(rows)
                advance(batch_task, description=f"epoch {epoch + 1} loss "
                                                f"{(totals.sum() / seen):.3f}")
            if progress is not None and batch_task is not None:
                progress.remove_task(batch_task)
            row = {"epoch": epoch + 1, "lr": lr,
                   "lesion_loss": round(totals[0] / max(seen, 1), 5),
                   "class_loss": round(totals[1] / max(seen, 1), 5),
                   **({"type_loss": round(totals[2] / max(seen, 1), 5)}
                      if profile.arch == "ladnn" else {}),
                   "slices_per_s": round(seen / max(time.time() - t0, 1e-9), 1)}
            if val is not None:
                row.update(evaluate_slices(net, val, device, cfg.batch_size))
            if best is not None:
                best.offer(net, epoch + 1, (row["val_lesion_acc"] + row["val_class_acc"]) / 2)
            epochs.done(row)
            advance(epoch_task)
    kept = best.restore(net, epochs.finished, progress) if best is not None \
        else epochs.finished
    return write_trained(model, {
        "kind": "slice-trained", "data": str(Path(cfg.data).resolve()),
        "profile": profile.name, "arch": profile.arch, "epochs": cfg.epochs, "lr": cfg.lr,
        "seed": cfg.seed,
        "focal": cfg.focal, "size_balanced": cfg.size_balanced, "flips": cfg.flips,
        "affine": cfg.affine, "crop": crop, "optimizer": cfg.optimizer,
        "level_epochs": cfg.level_epochs, "early_stop": cfg.early_stop, "kept_epoch": kept,
        "backbone_weights": Path(cfg.backbone_weights).name if cfg.backbone_weights else None,
        "from_model": start.get("model_version"),
        "from_model_sha256": start.get("content_sha256"),
        "train_slices": len(train), "seconds": round(time.time() - started, 1),
        "device": str(device), "run_dir": str(run.dir)}, cfg.out)


def start_from(model: LungSysModel, path: str) -> None:
    """Fine-tuning: the slice network's weights from another checkpoint of the same
    architecture and sizes (the shipped model's, to retrain it on one's own studies)."""
    other = load_checkpoint(path)
    mine, theirs = model.profile.to_dict(), other.profile.to_dict()
    differ = sorted(k for k in mine if k not in ("name", "crop") and mine[k] != theirs.get(k))
    if differ or other.patient_net is None:
        raise ValueError(f"{path}: profile {other.profile.name!r} does not fit "
                         f"{model.profile.name!r} ({', '.join(differ) or 'a volume model'})")
    model.slice_net.load_state_dict(other.slice_net.state_dict())


def task_losses(out, lesion: torch.Tensor, label: torch.Tensor, lesion_loss, class_loss,
                levels_alone: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 1's and task 2's losses of a batch: the joint classifier's, or in Hu 2020's
    first phase (``levels_alone``) each level's own classifier's, summed over the levels."""
    if not levels_alone:
        return lesion_loss(out.lesion_logits, lesion), class_loss(out.class_logits, label)
    return (sum(lesion_loss(lesion_of(s), lesion) for s in out.level_logits),
            sum(class_loss(s, label) for s in out.level_logits))


def type_loss(logits: torch.Tensor | None, types: np.ndarray, device) -> torch.Tensor:
    """LA-DNN's auxiliary task: binary cross-entropy of each lesion type, over the slices
    whose types are known (zero for a model without the head)."""
    if logits is None:
        return torch.zeros((), device=device)
    known = torch.from_numpy((types >= 0).all(axis=1)).to(device)
    if not known.any():
        return logits.sum() * 0.0
    target = torch.from_numpy(types.clip(0)).float().to(device)
    return F.binary_cross_entropy_with_logits(logits[known], target[known])


@torch.no_grad()
def evaluate_slices(net, data: SliceSet, device, batch_size: int) -> dict:
    """Validation loss (both tasks' cross-entropies, and the lesion types' where the
    model has them) and the accuracy of both tasks, at the middle window centre."""
    net.eval()
    correct, loss = np.zeros(2), 0.0
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(start + batch_size, len(data)))
        out = net(data.batch(rows, np.random.default_rng(0), "none", train=False).to(device))
        lesion = torch.from_numpy(data.lesion[rows]).to(device)
        label = torch.from_numpy(data.label[rows]).to(device)
        loss += len(rows) * float(F.cross_entropy(out.lesion_logits, lesion)
                                  + F.cross_entropy(out.class_logits, label)
                                  + type_loss(out.lesion_type_logits, data.types[rows], device))
        correct[0] += (out.lesion_logits.argmax(1).cpu().numpy() == data.lesion[rows]).sum()
        correct[1] += (out.class_logits.argmax(1).cpu().numpy() == data.label[rows]).sum()
    return {"val_loss": round(loss / len(data), 5),
            "val_lesion_acc": round(correct[0] / len(data), 4),
            "val_class_acc": round(correct[1] / len(data), 4)}
