"""What each training command takes, and the settings that cannot train, refused first.

Kept free of PyTorch: ``lungsys train ...`` says that an optimizer is misspelt, that an
architecture needs the other command or that the model to start from is not there before
anything else (its warnings about the data included), in about a second rather than after
the seconds PyTorch takes to import. The training modules (:mod:`training.train_slice`,
:mod:`training.train_patient`, :mod:`training.train_volume`) check the same before they
start, and run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from inference.model_file import read_metadata
from inference.profiles import CROPS, Profile, profile_for

#: The random flips slice training may draw.
FLIPS = ("horizontal", "both", "none")


@dataclass(kw_only=True)
class TrainingSettings:
    """What every training run takes; each network's config sets its paper defaults."""

    data: str
    out: str
    run_dir: str | None = None
    epochs: int
    lr: float
    lr_step: int
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "sgd"        # the paper's SGD; "adamw" converges faster from scratch
    beta1: float = 0.9            # adam / adamw: the moments' decay rates (Hu 2020: 0.5, 0.9)
    beta2: float = 0.999
    batch_size: int
    seed: int = 0
    device: str = "auto"
    cache_dir: str | None = None


@dataclass(kw_only=True)
class SliceTrainConfig(TrainingSettings):
    """Slice training; defaults are the paper's (110 epochs, lr 0.01 x0.1 every 40)."""

    profile: str = "small"
    arch: str = "m3"              # m3 | hu2020 | ladnn (dualsampling: train_volume)
    out: str = "slice.safetensors"
    epochs: int = 110
    lr: float = 0.01
    lr_step: int = 40
    batch_size: int = 32
    backbone_weights: str | None = None
    from_model: str | None = None  # a checkpoint whose slice network to start from (fine-tuning)
    focal: bool = False
    size_balanced: bool = False
    flips: str = "horizontal"
    affine: bool = False
    crop: str | None = None       # profiles.CROPS; None: the --from-model's, else lungs
    early_stop: int = 0           # stop after N epochs without a lower validation loss
    level_epochs: int = 0         # Hu 2020: epochs training each level's classifier alone


@dataclass(kw_only=True)
class PatientTrainConfig(TrainingSettings):
    """Patient training; defaults are the paper's (90 epochs, lr 0.001 x0.1 every 30)."""

    slice_model: str
    out: str = "model.safetensors"
    epochs: int = 90
    lr: float = 0.001
    lr_step: int = 30
    batch_size: int = 8


@dataclass(kw_only=True)
class VolumeTrainConfig(TrainingSettings):
    """Volume training; defaults are the paper's (§IV-C)."""

    profile: str = "small"
    arch: str = "dualsampling"
    out: str = "volume.safetensors"
    epochs: int = 20
    lr: float = 2e-4
    lr_step: int = 5
    batch_size: int = 20
    optimizer: str = "adamw"
    flips: bool = True            # random left-right flips (not in the paper)


def check_optimizer(cfg: TrainingSettings) -> None:
    """ValueError for an optimizer or betas :func:`training.runs.make_optimizer` cannot
    make."""
    if cfg.optimizer not in ("sgd", "adam", "adamw"):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected sgd, adam or adamw")
    for beta in (cfg.beta1, cfg.beta2):
        if cfg.optimizer != "sgd" and not 0 <= beta < 1:
            raise ValueError(f"the betas must be in [0, 1), not {beta}")


def checked_slice_profile(cfg: SliceTrainConfig) -> tuple[Profile, dict]:
    """The profile ``cfg`` trains and the metadata of the model it starts from ({}: none);
    ValueError (or CheckpointError) for settings that cannot go together."""
    check_optimizer(cfg)
    if cfg.flips not in FLIPS:
        raise ValueError(f"flips must be one of {', '.join(FLIPS)}")
    if cfg.backbone_weights and cfg.from_model:
        raise ValueError("start from backbone weights or from a model, not both")
    start = read_metadata(cfg.from_model) if cfg.from_model else {}
    crop = cfg.crop or start.get("profile", {}).get("crop", "lungs")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}")
    profile = dataclasses.replace(profile_for(cfg.arch, cfg.profile), crop=crop)
    if profile.volume:
        raise ValueError(f"--arch {cfg.arch} is a volume model: lungsys train volume")
    if cfg.level_epochs and profile.arch != "hu2020":
        raise ValueError("--level-epochs is Hu 2020's first phase (each level's classifier "
                         "on its own): --arch hu2020 only")
    return profile, start


def check_patient_settings(cfg: PatientTrainConfig) -> None:
    """ValueError (or CheckpointError) for settings that cannot train: an optimizer that
    cannot be made, a slice model that is not there or is a volume model."""
    check_optimizer(cfg)
    profile = Profile.from_dict(read_metadata(cfg.slice_model)["profile"])
    if profile.volume:
        raise ValueError(f"{cfg.slice_model} is a volume model ({profile.arch}): it has no "
                         f"patient network to train")


def checked_volume_profile(cfg: VolumeTrainConfig) -> Profile:
    """The profile ``cfg`` trains; ValueError for settings that cannot go together."""
    check_optimizer(cfg)
    profile = profile_for(cfg.arch, cfg.profile)
    if not profile.volume:
        raise ValueError(f"--arch {cfg.arch} is a slice model: lungsys train slice")
    if cfg.batch_size < 2:
        raise ValueError("batch size must be at least 2 (batch norm)")
    return profile
