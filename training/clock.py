"""What a person waiting on training reads: one line an epoch, with the time left.

Training runs for minutes on a GPU and hours on a CPU; a data scientist needs to
see it move (in a terminal and in a log alike), to know when it ends, and what
Ctrl-C keeps. No torch here: the command line imports it for its durations.
"""

from __future__ import annotations

import time

#: What an epoch's metrics are called in its line, in this order.
_NAMES = {"loss": "loss", "lesion_loss": "lesion loss", "class_loss": "class loss",
          "type_loss": "lesion-type loss", "attention_loss": "attention loss",
          "val_loss": "validation loss",
          "val_acc": "validation accuracy", "val_lesion_acc": "validation lesion accuracy",
          "val_class_acc": "validation class accuracy"}


class TrainingStopped(Exception):
    """Training interrupted (Ctrl-C): what was kept and how to go on, in one line."""

    def __init__(self, run_dir, done: int, epochs: int) -> None:
        super().__init__(
            f"stopped in epoch {done + 1} of {epochs}: "
            + (f"the {done} epoch(s) finished are kept in {run_dir}; run the same command "
               f"again to continue with epoch {done + 1}" if done else
               "no epoch had finished, nothing is kept"))
        self.done = done


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 07 min."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class EpochClock:
    """The line of each epoch: its metrics, how long it took, about how long is left (the
    mean of this session's epochs so far, times the epochs to go)."""

    def __init__(self, epochs: int, first: int) -> None:
        self.epochs = epochs
        self.first = first
        self.started = self.last = time.monotonic()

    def line(self, row: dict) -> str:
        now = time.monotonic()
        took, self.last = now - self.last, now
        parts = [f"{name} {row[key]:.3f}" if "loss" in key else
                 f"{name} {100 * row[key]:.1f}%" for key, name in _NAMES.items() if key in row]
        text = f"epoch {row['epoch']}/{self.epochs}: {', '.join(parts)}; {duration(took)}"
        done, left = row["epoch"] - self.first, self.epochs - row["epoch"]
        if left and done:
            text += f", about {duration((now - self.started) / done * left)} left"
        return text
