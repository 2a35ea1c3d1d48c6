"""Volume-level training: the dual-sampling attention network (Ouyang et al. 2020, §III).

Both branches learn in the same epochs, each from its own draw of the train
split's volumes: the US branch a shuffled pass over every study once (uniform
sampling), the SS branch as many draws by infection size (size-balanced
sampling, :func:`size_groups`). Each branch's loss is the classification
cross-entropy plus 0.5 times the attention loss (Eq. 3) against the study's
infection mask, on the diseased studies that have one. The paper's Adam,
weight decay 1e-4, lr 2e-4 x0.1 every 5 epochs, batch 20, 20 epochs, the
epoch with the best validation accuracy of the ensemble kept; every one is a
setting (the small profile trains from scratch faster at lr 1e-3 and batch 4).
Runs, resume, Ctrl-C and the epoch lines are those of slice training.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.checkpoint import LungSysModel
from inference.dualsampling import attention_loss, soft_mask, volume_shape
from training.cache import CachedVolume, load_volume
from training.dataset import read_manifest
from training.runs import BestEpoch, Epochs, make_optimizer, open_run, write_trained
from training.settings import VolumeTrainConfig, checked_volume_profile

#: Eq. 4's weight of the attention loss.
LAMBDA_EX = 0.5
#: The infected ratio that splits a disease's studies into small and large infections
#: (§III-C): COVID-19 0.030 and CAP 0.001 as the paper; H1N1 (not in the paper) at the
#: median of its training studies.
SIZE_SPLIT = {1: 0.030, 3: 0.001}


def size_groups(labels: np.ndarray, ratios: np.ndarray) -> np.ndarray:
    """The size-balanced sampling probability of each study (§III-C, four classes).

    Each disease is split at its ratio (:data:`SIZE_SPLIT`); the smaller of its two groups
    weighs N_larger / N_smaller, the larger 1 (restricted to COVID-19 and CAP this is the
    paper's rule); Healthy, and a disease whose studies all fall on one side, is one group
    of weight 2, as a disease of two equal groups (with weight 1 the branch would hardly
    see a healthy lung). A ratio below 0 (unknown) counts as large: never boosted. A group
    is drawn by its weight, then a study of it uniformly: the result is each study's
    probability of being drawn.
    """
    group = np.zeros(len(labels), dtype=int)      # 0 Healthy; 2k-1 / 2k small / large
    for k in (1, 2, 3):
        members = labels == k
        if not members.any():
            continue
        known = members & (ratios >= 0)
        split = SIZE_SPLIT.get(k, float(np.median(ratios[known])) if known.any() else 0.0)
        group[members] = np.where((ratios[members] >= 0) & (ratios[members] < split),
                                  2 * k - 1, 2 * k)
    weight = {0: 2.0}
    for k in (1, 2, 3):
        small, large = (group == 2 * k - 1).sum(), (group == 2 * k).sum()
        if small and large:
            weight[2 * k - 1] = max(large / small, 1.0)
            weight[2 * k] = max(small / large, 1.0)
        else:
            weight[2 * k - 1] = weight[2 * k] = 2.0
    present = np.unique(group)
    total = sum(weight.get(g, 1.0) for g in present)
    p = np.zeros(len(labels))
    for g in present:
        members = group == g
        p[members] = weight.get(g, 1.0) / total / members.sum()
    return p / p.sum()


class VolumeSet:
    """The cached volumes of a split, and batches of them."""

    def __init__(self, studies: list[CachedVolume]) -> None:
        self.studies = studies
        self.labels = np.array([s.entry.label for s in studies])
        self.ratios = np.array([s.ratio for s in studies])

    def __len__(self) -> int:
        return len(self.studies)

    def batch(self, rows, rng: np.random.Generator | None, flips: bool):
        x = np.stack([self.studies[r].volume for r in rows]).astype(np.float32)
        lung = np.stack([self.studies[r].lung for r in rows])
        infection = np.stack([self.studies[r].infection if self.studies[r].infection is not None
                              else np.zeros_like(self.studies[r].lung) for r in rows])
        known = np.array([self.studies[r].infection is not None for r in rows])
        if rng is not None and flips:
            flip = rng.random(len(rows)) < 0.5
            x[flip], lung[flip], infection[flip] = (a[flip][..., ::-1]
                                                    for a in (x, lung, infection))
        return (torch.from_numpy(np.ascontiguousarray(x))[:, None],
                torch.from_numpy(np.ascontiguousarray(lung)),
                torch.from_numpy(np.ascontiguousarray(infection)).float(),
                torch.from_numpy(known), torch.from_numpy(self.labels[list(rows)]))


def branch_loss(branch, x, label, infection, known) -> tuple[torch.Tensor, torch.Tensor]:
    """One branch's Eq. 4: cross-entropy, and the attention loss of the diseased studies
    with a mask (their true class's map against the mask), as a mean over the batch (zero
    for the others, as the paper's CAP cases)."""
    logits, f = branch(x)
    ce = F.cross_entropy(logits, label)
    use = known & (label > 0)
    if not use.any():
        return ce, ce * 0.0
    t = soft_mask(branch.attention(f[use], label[use]), tuple(x.shape[2:]))
    return ce, attention_loss(t, infection[use]) * (use.sum() / len(label))


@torch.no_grad()
def validation_accuracy(net, data: VolumeSet, device, batch_size: int) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        rows = list(range(start, min(start + batch_size, len(data))))
        x, lung, _, _, label = data.batch(rows, None, False)
        out = net(x.to(device), lung.to(device))
        correct += int((out.probabilities.argmax(1).cpu() == label).sum())
    return correct / max(len(data), 1)


def train_volume(cfg: VolumeTrainConfig, progress=None) -> dict:
    """Train both branches; writes the checkpoint and returns its metadata."""
    profile = checked_volume_profile(cfg)
    run, device, cache_dir = open_run(cfg)
    torch.manual_seed(cfg.seed)
    model = LungSysModel.create(profile, cfg.seed)
    net = model.slice_net.to(device)
    shape = volume_shape(profile)

    def load(split: str) -> VolumeSet:
        entries = read_manifest(cfg.data, split)
        t = progress.add_task(f"caching {split} volumes", total=len(entries)) \
            if progress is not None and entries else None
        studies = []
        for entry in entries:
            studies.append(load_volume(entry, shape, cache_dir))
            if t is not None:
                progress.advance(t)
        return VolumeSet(studies)

    train, val = load("train"), load("val")
    if len(train) < 2:
        raise ValueError("volume training needs at least 2 train studies")
    run.log.info(f"{len(train)} training volumes, {len(val)} validation volumes")
    optimizer = make_optimizer(cfg, net)
    epochs = Epochs(run, cfg, net, optimizer, progress)
    best = BestEpoch(run, fresh=epochs.finished == 0)
    sampling = size_groups(train.labels, train.ratios)
    steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    epoch_task = progress.add_task("volume training", total=cfg.epochs,
                                   completed=epochs.finished) if progress is not None else None
    started = time.time()
    with epochs:
        for epoch, lr, rng in epochs:
            uniform = rng.permutation(len(train))
            balanced = rng.choice(len(train), size=len(train), p=sampling)
            net.train()
            totals, seen, t0 = np.zeros(2), 0, time.time()
            for b in range(steps):
                optimizer.zero_grad(set_to_none=True)
                stepped = False
                for branch, order in ((net.us, uniform), (net.ss, balanced)):
                    rows = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    if len(rows) < 2:
                        continue                  # batch norm needs two samples
                    x, _, infection, known, label = train.batch(rows, rng, cfg.flips)
                    ce, ex = branch_loss(branch, x.to(device), label.to(device),
                                         infection.to(device), known.to(device))
                    (ce + LAMBDA_EX * ex).backward()     # one branch's graph at a time
                    totals += [ce.item() * len(rows), ex.item() * len(rows)]
                    seen += len(rows)
                    stepped = True
                if stepped:
                    optimizer.step()
            row = {"epoch": epoch + 1, "lr": lr,
                   "class_loss": round(totals[0] / max(seen, 1), 5),
                   "attention_loss": round(totals[1] / max(seen, 1), 5),
                   "volumes_per_s": round(seen / max(time.time() - t0, 1e-9), 2)}
            if len(val):
                row["val_acc"] = round(validation_accuracy(net, val, device, cfg.batch_size), 4)
            best.offer(net, epoch + 1, row.get("val_acc"))
            epochs.done(row)
            if epoch_task is not None:
                progress.advance(epoch_task)
    kept = best.restore(net, epochs.finished, progress)
    return write_trained(model, {
        "kind": "volume-trained", "data": str(Path(cfg.data).resolve()),
        "profile": profile.name, "arch": profile.arch, "epochs": cfg.epochs, "lr": cfg.lr,
        "seed": cfg.seed, "kept_epoch": kept, "train_volumes": len(train),
        "seconds": round(time.time() - started, 1), "device": str(device),
        "run_dir": str(run.dir)}, cfg.out)

