"""Model profiles: an architecture and its sizes, the paper's for GPUs, small ones for CPUs.

``paper`` and ``small`` are M3 Lung-Sys (``arch = "m3"``); ``small`` is
narrower (ResNet width 8 instead of 64), reads 256x256 crops instead of
512x512, and has a smaller patient head (D' = 64, h = 4), so that it trains
and runs on a 2-core CPU (about 150 slice-forwards per second there) and ships
in a few MB. The seeds' other architectures (docs/models.md) have profiles of
their own, named ``ARCH-paper`` and ``ARCH-small`` (:func:`profile_for`); every
one ends in the same patient network over its slices' features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

CLASSES = ("Healthy", "COVID-19", "H1N1", "CAP")
#: The crops a model may be trained with (``Profile.crop``): the paper's lung box, or that
#: box joined with its mirror image about the body's midline (:mod:`inference.preprocess`).
CROPS = ("lungs", "mirrored")


@dataclass(frozen=True)
class Profile:
    """The sizes of one model profile (``paper`` for GPUs, ``small`` for CPUs)."""

    name: str
    width: int                 # ResNet-50 base width (torchvision: 64)
    input_size: int            # crops are resized to input_size x input_size
    d_prime: int               # D': per-head width of the patient head
    heads: int                 # h: heads of the refinement module
    scales: tuple[int, ...]    # S: multi-scale splits of the slices
    arch: str = "m3"           # m3 | hu2020 | ladnn | dualsampling (docs/models.md)
    backbone: str = "resnet50"  # resnet50 | densenet169 | vgg16 | hu2020 | resnet34-3d
    depth: int = 0             # slices of the resampled volume (a volume model's; else 0)
    crop: str = "lungs"        # lungs (the paper's box) | mirrored (CROPS)

    @property
    def volume(self) -> bool:
        """Whether the model reads the whole volume (dual sampling), not slices."""
        return self.arch == "dualsampling"

    @property
    def layer3_channels(self) -> int:
        from inference.backbone import EXPANSION   # (PyTorch; read a profile without it)

        return self.width * 4 * EXPANSION

    @property
    def layer4_channels(self) -> int:
        from inference.backbone import EXPANSION

        return self.width * 8 * EXPANSION

    @property
    def slice_feature_dim(self) -> int:
        """D: M3's GAP of ResBlock3 concatenated with GAP of ResBlock4; LA-DNN's GAP of the
        backbone's last features and its five lesion-type probabilities."""
        if self.arch == "ladnn":
            from inference.ladnn import feature_dim
            return feature_dim(self)
        if self.arch == "hu2020":
            from inference.hu2020 import feature_dim as hu_dim
            return hu_dim(self)
        if self.volume:
            return 0          # no slice features: the volume model decides for the patient
        return self.layer3_channels + self.layer4_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        return cls(name=str(d["name"]), width=int(d["width"]), input_size=int(d["input_size"]),
                   d_prime=int(d["d_prime"]), heads=int(d["heads"]),
                   scales=tuple(int(s) for s in d["scales"]),
                   arch=str(d.get("arch", "m3")),      # (checkpoints before architectures)
                   backbone=str(d.get("backbone", "resnet50")), depth=int(d.get("depth", 0)),
                   crop=str(d.get("crop", "lungs")))


PROFILES = {
    "paper": Profile("paper", width=64, input_size=512, d_prime=512, heads=12,
                     scales=(1, 2, 3, 4)),
    "small": Profile("small", width=8, input_size=256, d_prime=64, heads=4,
                     scales=(1, 2, 3, 4)),
    # LA-DNN (Liu et al.): DenseNet-169, the paper's best backbone, at ImageNet's 224
    "ladnn-paper": Profile("ladnn-paper", width=32, input_size=224, d_prime=512, heads=12,
                           scales=(1, 2, 3, 4), arch="ladnn", backbone="densenet169"),
    "ladnn-small": Profile("ladnn-small", width=8, input_size=128, d_prime=64, heads=4,
                           scales=(1, 2, 3, 4), arch="ladnn", backbone="densenet169"),
    # LA-DNN on VGG-16, the paper's other backbone (--arch ladnn --profile vgg16-small)
    "ladnn-vgg16-paper": Profile("ladnn-vgg16-paper", width=64, input_size=224, d_prime=512,
                                 heads=12, scales=(1, 2, 3, 4), arch="ladnn", backbone="vgg16"),
    "ladnn-vgg16-small": Profile("ladnn-vgg16-small", width=8, input_size=128, d_prime=64,
                                 heads=4, scales=(1, 2, 3, 4), arch="ladnn", backbone="vgg16"),
    # Hu et al. 2020: its own five-block network (32-256 channels at width 64), 224 inputs
    "hu2020-paper": Profile("hu2020-paper", width=64, input_size=224, d_prime=512, heads=12,
                            scales=(1, 2, 3, 4), arch="hu2020", backbone="hu2020"),
    "hu2020-small": Profile("hu2020-small", width=16, input_size=128, d_prime=64, heads=4,
                            scales=(1, 2, 3, 4), arch="hu2020", backbone="hu2020"),
    # the dual-sampling attention network (Ouyang et al.): two 3D ResNet-34s over the lungs'
    # volume, 138 x 256 x 256 as the paper's; the small one 32 x 64 x 64 at width 8
    "dualsampling-paper": Profile("dualsampling-paper", width=64, input_size=256, d_prime=64,
                                  heads=4, scales=(1,), arch="dualsampling",
                                  backbone="resnet34-3d", depth=138),
    "dualsampling-small": Profile("dualsampling-small", width=8, input_size=64, d_prime=64,
                                  heads=4, scales=(1,), arch="dualsampling",
                                  backbone="resnet34-3d", depth=32),
}
#: The architectures a model can have (``--arch``).
ARCHITECTURES = ("m3", "hu2020", "ladnn", "dualsampling")


def profile_for(arch: str, size: str) -> Profile:
    """The profile of an architecture at a size (``paper`` or ``small``; LA-DNN also
    ``vgg16-paper`` and ``vgg16-small``), or by the profile's whole name (``ladnn-small``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of "
                         f"{', '.join(ARCHITECTURES)}")
    names = [name for name, profile in PROFILES.items() if profile.arch == arch]
    for name in (f"{arch}-{size}", size):
        if name in names:
            return PROFILES[name]
    sizes = [name.removeprefix(f"{arch}-") for name in names]
    raise ValueError(f"{arch} has no profile {size!r}; expected one of {', '.join(sizes)}")


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; expected one of "
                         f"{', '.join(PROFILES)}") from None
