"""Model checkpoints: safetensors weights with JSON metadata, no pickle.

One ``.safetensors`` file holds both networks (keys ``slice.*`` and
``patient.*``; a volume model's one network ``volume.*``) and, in its
header, a JSON document under the key ``lungsys``: the profile, the class
names and order, the preprocessing parameters, the model version, a SHA-256
of the weights (``content_sha256``, the model's identity: the Device UID of
results derives from it), training provenance and evaluation metrics when
known, and an ``integrity`` hash over weights and metadata together. Loading
recomputes both hashes, builds the networks from the profile and loads the
weights strictly; a truncated, mismatched or tampered file is refused with a
one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from inference import preprocess
from inference.model_file import (FORMAT, METADATA_KEY, CheckpointError,
                                  one_line as _one_line, read_metadata, untrained)
from inference.profiles import CLASSES, CROPS, Profile, get_profile
from inference.patient_net import PatientNet
from inference.slice_net import SliceNet
from inference.version import software_version

#: The model that ships with lungsys (trained on synthetic phantoms), package data.
SHIPPED_MODEL = Path(__file__).parent / "models" / "lungsys-small-phantom.safetensors"
_DEVICE_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:lungsys:model")


def slice_net_for(profile: Profile) -> nn.Module:
    """The slice network of the profile's architecture."""
    if profile.arch == "ladnn":
        from inference.ladnn import LaDnnSliceNet
        return LaDnnSliceNet(profile)
    if profile.arch == "hu2020":
        from inference.hu2020 import HuSliceNet
        return HuSliceNet(profile)
    if profile.volume:
        from inference.dualsampling import DualSamplingNet
        return DualSamplingNet(profile)
    if profile.arch != "m3":
        raise CheckpointError(f"unknown architecture {profile.arch!r}")
    return SliceNet(profile)


def load_backbone_weights(model: "LungSysModel", path: str | Path) -> None:
    """Start the slice network's backbone from a torchvision ImageNet weights file of its
    kind (ResNet-50, DenseNet-169 or VGG-16: key names checked strictly)."""
    from inference.backbone import load_torchvision_weights, read_state_dict

    if model.profile.backbone == "hu2020":
        raise CheckpointError("Hu et al. 2020 train their network from scratch: it has no "
                              "ImageNet weights to start from")
    if model.profile.volume:
        raise CheckpointError("the dual-sampling network is 3D and trained from scratch: "
                              "there are no ImageNet weights of it to start from")
    state = read_state_dict(path)
    backbone = model.slice_net.backbone
    if model.profile.backbone == "densenet169":
        from inference.densenet import load_torchvision_densenet169
        load_torchvision_densenet169(backbone, state)
    elif model.profile.backbone == "vgg16":
        from inference.vgg import load_torchvision_vgg16
        load_torchvision_vgg16(backbone, state)
    else:
        load_torchvision_weights(backbone, state)


def preprocessing_parameters(profile: Profile) -> dict:
    return {
        "lung_threshold_hu": preprocess.LUNG_THRESHOLD_HU,
        "opening_kernel": list(preprocess.OPENING_KERNEL),
        "margin_px": preprocess.MARGIN_PX,
        "window_width": preprocess.WINDOW_WIDTH,
        "inference_centres": list(preprocess.INFERENCE_CENTRES),
        "training_centre_range": list(preprocess.TRAINING_CENTRE_RANGE),
        "input_size": profile.input_size,
        "crop": profile.crop,
    }


@dataclass
class LungSysModel:
    """Both networks of one model and what is known about them."""

    profile: Profile
    #: SliceNet (M3) or another architecture's (slice_net_for); a volume model's only network
    slice_net: nn.Module
    patient_net: PatientNet | None    # None for a volume model: it decides for the patient
    metadata: dict = field(default_factory=dict)

    @classmethod
    def create(cls, profile: Profile | str, seed: int = 0) -> "LungSysModel":
        """Randomly initialised networks (deterministic for a seed)."""
        if isinstance(profile, str):
            profile = get_profile(profile)
        torch.manual_seed(seed)
        model = cls(profile, slice_net_for(profile), patient_net_for(profile))
        model.metadata = {"provenance": {"kind": "init", "seed": seed}, "metrics": None,
                          "model_version": None}
        return model

    def untrained(self, network_diagnosis: bool = True) -> str:
        """What is untrained where this model's diagnosis comes from (:func:`untrained`)."""
        return untrained(self.metadata, self.patient_net is not None, network_diagnosis)

    @property
    def networks(self) -> dict[str, nn.Module]:
        """The networks by their key prefix in the checkpoint."""
        if self.patient_net is None:
            return {"volume": self.slice_net}
        return {"slice": self.slice_net, "patient": self.patient_net}

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{prefix}.{k}": v for prefix, net in self.networks.items()
                for k, v in net.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        parts: dict[str, dict[str, Tensor]] = {prefix: {} for prefix in self.networks}
        for key, value in state.items():
            part, _, name = key.partition(".")
            if part not in parts:
                raise CheckpointError(f"unexpected tensor {key!r}")
            parts[part][name] = value
        try:
            for prefix, net in self.networks.items():
                net.load_state_dict(parts[prefix], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CheckpointError(f"weights do not fit profile {self.profile.name!r}: "
                                  f"{' '.join(line.strip() for line in first[:2])[:200]}") \
                from None

    @property
    def content_sha256(self) -> str:
        return tensors_sha256(self.state_dict())

    @property
    def device_uid(self) -> str:
        """A DICOM UID that changes whenever the weights change."""
        return f"2.25.{uuid.uuid5(_DEVICE_UID_NAMESPACE, self.content_sha256).int}"

    @property
    def version(self) -> str:
        return self.metadata.get("model_version") or f"{self.profile.name}-" \
            f"{self.content_sha256[:12]}"

    def to(self, device: torch.device | str) -> "LungSysModel":
        for net in self.networks.values():
            net.to(device)
        return self

    def eval(self) -> "LungSysModel":
        for net in self.networks.values():
            net.eval()
        return self


def patient_net_for(profile: Profile) -> PatientNet | None:
    """The patient network over slice features; a volume model has none."""
    return None if profile.volume else PatientNet(profile)


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of tensors, in name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _integrity(content_sha256: str, metadata: dict) -> str:
    body = {k: v for k, v in metadata.items() if k != "integrity"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((content_sha256 + text).encode()).hexdigest()


def save_checkpoint(model: LungSysModel, path: str | Path) -> dict:
    """Write the model to ``path`` (a .safetensors file); returns the metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    content = tensors_sha256(state)
    meta = {
        **model.metadata,
        "format": FORMAT,
        "profile": model.profile.to_dict(),
        "classes": list(CLASSES),
        "preprocessing": preprocessing_parameters(model.profile),
        "content_sha256": content,
        "device_uid": model.device_uid,
        "lungsys_version": software_version(),
        "created": model.metadata.get("created")
        or dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "parameters": sum(int(v.numel()) for k, v in state.items()
                          if not k.endswith("num_batches_tracked")),
    }
    meta["model_version"] = model.metadata.get("model_version") or \
        f"{model.profile.name}-{content[:12]}"
    meta["integrity"] = _integrity(content, meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    tmp.replace(path)
    model.metadata = meta
    return meta


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> LungSysModel:
    """Load and verify a checkpoint; the model is in eval mode on ``device``."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: weights cannot be read ({_one_line(exc)})") from None
    content = tensors_sha256(state)
    if content != meta.get("content_sha256"):
        raise CheckpointError(f"{path}: weights do not match their recorded SHA-256 "
                              f"(corrupted or altered)")
    if _integrity(content, meta) != meta.get("integrity"):
        raise CheckpointError(f"{path}: metadata does not match its integrity hash "
                              f"(altered)")
    if list(meta.get("classes", [])) != list(CLASSES):
        raise CheckpointError(f"{path}: classes {meta.get('classes')} differ from "
                              f"{list(CLASSES)}")
    try:
        profile = Profile.from_dict(meta["profile"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: metadata has no usable profile") from None
    if profile.crop not in CROPS:
        raise CheckpointError(f"{path}: crop {profile.crop!r} is not one this lungsys knows "
                              f"({', '.join(CROPS)}): a newer lungsys made it")
    model = LungSysModel(profile, slice_net_for(profile), patient_net_for(profile), meta)
    model.load_state_dict(state)
    return model.to(device).eval()


def default_model() -> Path:
    """The shipped model's path; CheckpointError when this installation has none."""
    if not SHIPPED_MODEL.is_file():
        raise CheckpointError("no model given and no shipped model in this installation: "
                              "pass a checkpoint (--model, or [model] checkpoint)")
    return SHIPPED_MODEL
