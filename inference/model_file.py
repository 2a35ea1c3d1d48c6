"""A checkpoint file's metadata, read without PyTorch.

The command line checks a training command's settings against the checkpoint it starts
from (its architecture, its crop) before anything else; reading that JSON header must
not cost the seconds PyTorch takes to import. :mod:`inference.checkpoint` loads the
weights and re-exports what is here.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "lungsys-model/1"
#: The key of the safetensors header's metadata under which lungsys keeps its JSON.
METADATA_KEY = "lungsys"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason in one line."""


def one_line(exc: Exception) -> str:
    """An exception's first line (or its type), at most 160 characters."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def read_metadata(path: str | Path) -> dict:
    """The metadata of a checkpoint, without loading (or checking) its weights."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file (.safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file "
                              f"({one_line(exc)})") from None
    if raw is None:
        raise CheckpointError(f"{path}: no lungsys metadata (not a lungsys checkpoint)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def untrained(metadata: dict, patient_network: bool, network_diagnosis: bool = True) -> str:
    """What is untrained where the diagnosis of a model with this ``metadata`` comes from
    (:data:`inference.model_info.UNTRAINED`'s keys; "" for a trained model): "model" when
    'lungsys model init' made it (or the slice network its patient network learnt from);
    "patient" when only its slice network was trained ('lungsys train slice') and its
    ``patient_network``'s diagnosis is read (``network_diagnosis``)."""
    provenance = metadata.get("provenance")
    provenance = provenance if isinstance(provenance, dict) else {}
    kind = provenance.get("kind")
    below = provenance.get("slice")
    if kind == "init" or (isinstance(below, dict) and below.get("kind") == "init"):
        return "model"
    if kind == "slice-trained" and patient_network and network_diagnosis:
        return "patient"
    return ""
