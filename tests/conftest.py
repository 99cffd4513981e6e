"""Shared fixtures: the real val split (read in place from ../shared), LiteMedSAM, and a tiny fake runtime."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path

# Tests never touch the user's caches (~/.cache/cp-tinyvit): opening an embedding cache may evict other encoders'
# entries there. Set before zoo is imported, as zoo.runtime.embedding_cache reads it at import; child processes
# inherit it. Removed when the session ends.
_CACHE = tempfile.mkdtemp(prefix="cp-tinyvit-test-cache-")
os.environ["CP_TINYVIT_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from zoo.data.io import data_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VAL_DIR = data_split("val")  # $MEDSEG_DATA/val, as every command takes it
REFERENCE_DIR = SHARED / "reference/litemedsam-official-val"

# A test run started in the background of a non-interactive shell (`.ci/run &`) inherits SIGINT ignored (POSIX) and
# Python keeps it so: the Ctrl-C tests then see no KeyboardInterrupt. They test Python's default, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def val_dir() -> Path:
    if not VAL_DIR.is_dir():
        pytest.skip(f"real val data not found at {VAL_DIR}")
    return VAL_DIR


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"official LiteMedSAM reference not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def litemedsam():
    from zoo.models.factory import build_litemedsam

    return build_litemedsam()


class BrightRuntime:
    """A stand-in model: the 'embedding' is the image, and a box's mask is the bright (> 0.5) pixels inside it.
    Lets tests check propagation and bookkeeping exactly and fast. Counts encoder calls."""

    has_modality_head = False

    def __init__(self):
        self.embed_calls = 0

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        self.embed_calls += 1
        return image.clone()

    def predict_modality(self, embedding):
        return None

    def decode(self, embedding, boxes, modality=None):
        bright = embedding[0, 0] > 0.5
        ys, xs = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        out = []
        for x0, y0, x1, y1 in boxes.tolist():
            inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
            out.append(torch.where(bright & inside, 10.0, -10.0))
        return torch.stack(out)[:, None]


@pytest.fixture
def bright_runtime() -> BrightRuntime:
    return BrightRuntime()
