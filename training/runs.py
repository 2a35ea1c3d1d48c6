"""Run directories: the config, a log, per-epoch metrics, and resumable state.

A run directory holds ``config.json`` (every hyper-parameter), ``train.log``,
``metrics.csv`` (one row per epoch) and ``resume.safetensors`` (the model,
the optimiser's state tensors and, in its metadata, the last finished
epoch), so that a run that was interrupted continues from its last epoch.
No pickle: the state is safetensors with JSON metadata.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.clock import EpochClock, TrainingStopped
from training.settings import TrainingSettings, check_optimizer


def default_cache_dir(data: str) -> Path:
    """DATA/.lungsys-cache: where a dataset's preprocessed slices and volumes are kept."""
    root = Path(data)
    return (root if root.is_dir() else root.parent) / ".lungsys-cache"


def open_run(cfg: TrainingSettings) -> tuple["Run", torch.device, Path]:
    """What every training command starts with: its run folder (OUT.run unless given;
    refused when an unfinished run there had other settings), the device and the cache."""
    from inference.engine import select_device

    run = Run(cfg.run_dir or Path(cfg.out).with_suffix(".run"), dataclasses.asdict(cfg),
              defaults_of(cfg))
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(cfg.data)
    return run, select_device(cfg.device), cache_dir


def write_trained(model, provenance: dict, out: str) -> dict:
    """Write a trained model's checkpoint (on the CPU) with its provenance, under a new
    version and date; returns its metadata."""
    from inference.checkpoint import save_checkpoint

    model.to("cpu")
    model.metadata["provenance"] = provenance
    model.metadata["model_version"] = None
    model.metadata["created"] = None
    return save_checkpoint(model, out)


def defaults_of(cfg) -> dict:
    """A training config's settings that have defaults, at their defaults."""
    return {f.name: f.default for f in dataclasses.fields(cfg)
            if f.default is not dataclasses.MISSING}


class Run:
    """A training run's folder: its configuration, log, metrics and resume state."""

    def __init__(self, directory: str | Path, config: dict,
                 defaults: dict | None = None) -> None:
        """``defaults``: what a setting was before it existed (an older run's config.json
        lacks it), so that such a run still resumes."""
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.log = logging.getLogger(f"lungsys.train.{self.dir.name}")
        self.log.setLevel(logging.INFO)
        self.log.propagate = False  # the log file has it; the terminal shows progress bars
        if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == self.log_path
                   for h in self.log.handlers):
            handler = logging.FileHandler(self.log_path, encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.log.addHandler(handler)
        previous = self.dir / "config.json"
        if previous.is_file():
            old = json.loads(previous.read_text())
            known = defaults or {}
            changed = {k for k in set(old) | set(config)
                       if k not in ("epochs", "device", "out")
                       and old.get(k, known.get(k)) != config.get(k, known.get(k))}
            if changed and self.resume_path.is_file():
                raise ValueError(f"run {self.dir} was started with other settings "
                                 f"({', '.join(sorted(changed))}); use another --run-dir")
        previous.write_text(json.dumps(config, indent=1, default=str))

    @property
    def log_path(self) -> Path:
        return self.dir / "train.log"

    @property
    def resume_path(self) -> Path:
        return self.dir / "resume.safetensors"

    def rows(self) -> list[dict]:
        """The metrics of the epochs recorded so far (metrics.csv; text values)."""
        path = self.dir / "metrics.csv"
        if not path.is_file():
            return []
        with path.open(newline="") as f:
            return list(csv.DictReader(f))

    def record(self, row: dict) -> None:
        """Add an epoch's row to metrics.csv; when its columns are not the file's (a run
        begun by an older lungsys, resumed), the file is written again with both's."""
        path = self.dir / "metrics.csv"
        rows = self.rows()
        fields = list(dict.fromkeys([*(rows[0] if rows else {}), *row]))
        rewrite = not rows or fields != list(rows[0])
        with path.open("w" if rewrite else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            if rewrite:
                writer.writeheader()
                writer.writerows(rows)
            writer.writerow(row)
        self.log.info(json.dumps(row))

    def save_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   epoch: int) -> None:
        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in model.state_dict().items()}
        names = {id(p): n for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"opt.{key}.{names[id(p)]}"] = value.detach().cpu().contiguous()
        tmp = self.resume_path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"epoch": str(epoch)})
        tmp.replace(self.resume_path)

    def load_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Restore the last state; returns the number of finished epochs (0 if none)."""
        if not self.resume_path.is_file():
            return 0
        with safe_open(str(self.resume_path), framework="pt") as f:
            epoch = int((f.metadata() or {}).get("epoch", 0))
        tensors = load_file(str(self.resume_path))
        device = next(model.parameters()).device
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        params = dict(model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, state_key, name = key.split(".", 2)
                optimizer.state[params[name]][state_key] = value.to(device)
        return epoch

    def tell(self, text: str, progress=None) -> None:
        """A line for the person waiting (on ``progress``'s console, above its bars) and for
        the run's log."""
        self.log.info(text)
        if progress is not None:
            progress.console.print(text, markup=False, highlight=False)

    def resuming(self, done: int, epochs: int, progress=None) -> None:
        """Say that a run goes on from where it stopped (nothing when it starts afresh)."""
        if done:
            self.tell(f"resuming the run in {self.dir}: {done} of {epochs} epochs done; "
                      + (f"continuing with epoch {done + 1}" if done < epochs
                         else "writing the checkpoint"), progress)


class Epochs:
    """The epochs a run has still to train, and what each finished one leaves behind.

    Made after the optimiser: it restores the last finished epoch (``finished``). Entered,
    it says when the run resumes; iterated, it gives ``(epoch, lr, rng)`` from the first
    unfinished epoch (:func:`begin_epoch`); :meth:`done` records an epoch's row, saves the
    resume state and prints the epoch's line; Ctrl-C inside the ``with`` becomes
    :class:`~training.clock.TrainingStopped`, which says what was kept and how to go on.
    """

    def __init__(self, run: Run, cfg: TrainingSettings, net: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, progress=None) -> None:
        self.run, self.cfg, self.net, self.optimizer = run, cfg, net, optimizer
        self.progress = progress
        self.finished = run.load_state(net, optimizer)

    def __enter__(self) -> "Epochs":
        self.run.resuming(self.finished, self.cfg.epochs, self.progress)
        self.clock = EpochClock(self.cfg.epochs, self.finished)
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            raise TrainingStopped(self.run.dir, self.finished, self.cfg.epochs) from None
        return False

    def __iter__(self):
        for epoch in range(self.finished, self.cfg.epochs):
            if self.stalled():
                return
            yield (epoch, *begin_epoch(self.cfg, self.optimizer, epoch))

    def stalled(self) -> bool:
        """Early stopping (the config's ``early_stop``: N epochs, 0 never): the validation
        loss has not fallen below its lowest for N epochs. Read from metrics.csv, so that a
        resumed run stops where the uninterrupted one would have; says so once."""
        patience = getattr(self.cfg, "early_stop", 0)
        losses = {int(r["epoch"]): float(r["val_loss"]) for r in self.run.rows()
                  if r.get("val_loss") and int(r["epoch"]) <= self.finished} if patience else {}
        if len(losses) <= patience:
            return False
        lowest = min(losses, key=lambda e: (losses[e], e))
        if self.finished - lowest < patience:
            return False
        self.run.tell(f"stopping early after epoch {self.finished} of {self.cfg.epochs}: the "
                      f"validation loss has not fallen since epoch {lowest} "
                      f"({losses[lowest]:.4f}) for {patience} epoch(s)", self.progress)
        return True

    def done(self, row: dict) -> None:
        """The epoch ``row["epoch"]`` finished: its resume state, metrics and line, kept
        together (a Ctrl-C meanwhile waits for them: never a metrics row without its state,
        nor a stop message that counts one epoch fewer than was kept)."""
        with _uninterrupted():
            self.run.save_state(self.net, self.optimizer, row["epoch"])
            self.run.record(row)
            self.finished = row["epoch"]
            self.run.tell(self.clock.line(row), self.progress)


class BestEpoch:
    """The weights of the epoch with the best validation accuracy so far, kept in the run
    folder (``best.safetensors``, the epoch and accuracy in its metadata) for a run that
    writes its best epoch rather than its last; a resumed run goes on comparing with it."""

    def __init__(self, run: Run, fresh: bool) -> None:
        self.run = run
        self.path = run.dir / "best.safetensors"
        if fresh:
            self.path.unlink(missing_ok=True)       # an earlier run's, not this one's
        self.epoch, self.accuracy = 0, -1.0
        if self.path.is_file():
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
            self.epoch, self.accuracy = int(meta.get("epoch", 0)), float(meta.get("val_acc", -1))

    def offer(self, net: torch.nn.Module, epoch: int, accuracy: float | None) -> None:
        """Keep the epoch's weights if its accuracy beats the best (None, no validation
        split: every epoch is the best so far)."""
        if accuracy is not None and accuracy <= self.accuracy:
            return
        self.epoch, self.accuracy = epoch, -1.0 if accuracy is None else accuracy
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        tmp = self.path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"epoch": str(epoch),
                                               "val_acc": str(self.accuracy)})
        tmp.replace(self.path)

    def restore(self, net: torch.nn.Module, last: int, progress=None) -> int:
        """Load the best epoch's weights into ``net`` and say which; returns its number
        (``last`` when none was kept: the last epoch's weights stay)."""
        if not self.path.is_file():              # (removed by hand)
            self.run.tell(f"no best epoch kept in {self.run.dir}: the last epoch's weights "
                          f"are written", progress)
            return last
        net.load_state_dict(load_file(str(self.path)))
        self.run.tell(f"writing epoch {self.epoch}'s weights, the best validation accuracy "
                      f"({100 * self.accuracy:.1f}%)" if self.accuracy >= 0 else
                      f"writing epoch {self.epoch}'s weights", progress)
        return self.epoch


@contextmanager
def _uninterrupted():
    """Hold back Ctrl-C (SIGINT) until the block is done, then raise it; only in the main
    thread, where Python delivers it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def begin_epoch(cfg: TrainingSettings, optimizer: torch.optim.Optimizer,
                epoch: int) -> tuple[float, "np.random.Generator"]:
    """Set the epoch's learning rate and seed everything random in it.

    Seeding from (seed, epoch) makes a resumed run draw what an uninterrupted
    one would have. Returns the learning rate and the epoch's generator.
    """
    lr = step_lr(cfg.lr, epoch, cfg.lr_step, cfg.lr_gamma)
    for group in optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(cfg.seed * 100_003 + epoch)
    return lr, np.random.default_rng([cfg.seed, epoch])


def step_lr(base: float, epoch: int, step: int, gamma: float) -> float:
    """The paper's schedule: ``base`` times ``gamma`` every ``step`` epochs."""
    return base * gamma ** (epoch // step)


def make_optimizer(cfg, net: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (M3's paper's), Adam (Hu 2020's; weight decay as an L2 term) or
    AdamW, from a training config."""
    check_optimizer(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return kinds[cfg.optimizer](net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay)
