"""Image embeddings kept on disk, keyed by the preprocessed image's content and by the encoder that made them.

Layout: CACHE_DIR/<encoder id>/<key[:2]>/<key>.npy with key = sha256(preprocessing version, preprocessed image).
Entries are written under a temporary name and renamed, so an interrupted run leaves no half-written entry.
Distillation keeps teacher embeddings in float16 (distill.cache); benchmarks keep float32, so that a variant
scored from cached embeddings gets exactly the masks it would get without the cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from zoo.io import atomic_path

PREPROCESSING_VERSION = b"longest-side-256-inter-area/minmax/pad-bottom-right/v1"
DEFAULT_CACHE_DIR = Path(os.environ.get("CP_TINYVIT_CACHE", Path.home() / ".cache" / "cp-tinyvit"))
ENCODER_CACHE_DIR = DEFAULT_CACHE_DIR / "encoders"  # CachedEncoder's float32 entries (benchmarks, validation)


def image_key(image: torch.Tensor) -> str:
    """Content key of a preprocessed (3, 256, 256) or (1, 3, 256, 256) image."""
    digest = hashlib.sha256(PREPROCESSING_VERSION)
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


def module_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, shapes, values): equal exactly when its outputs would be."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def encoder_cache_id(model) -> str:
    """The cache folder of a model's encoder: LiteMedSAM and every model fine-tuned on its frozen encoder share it."""
    return f"encoder-{model.encoder_fingerprint()[:16]}"


class EmbeddingCache:
    """Embeddings of one encoder (`encoder_id` names its folder) stored as `dtype`."""

    def __init__(self, root: Path, encoder_id: str, dtype: torch.dtype = torch.float16):
        self.dir = Path(root) / encoder_id
        self.dtype = dtype
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError):
            path.unlink(missing_ok=True)  # a damaged entry is recomputed, not trusted
            return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        with atomic_path(self.path(key)) as tmp, open(tmp, "wb") as handle:
            np.save(handle, embedding.to(self.dtype).cpu().numpy(), allow_pickle=False)


class CachedEncoder:
    """Any model variant (zoo.runtime's interface) whose embed() is looked up in a float32 EmbeddingCache first.

    Variants with the same encoder weights (say LiteMedSAM and a class-prompt model fine-tuned on its frozen
    encoder) share entries, so a benchmark embeds each image once. Everything else is the wrapped model's."""

    def __init__(self, model, root: Path):
        self.model = model
        self.cache = EmbeddingCache(root, encoder_cache_id(model), torch.float32)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        key = image_key(image)
        embedding = self.cache.get(key)
        if embedding is not None:
            self.cache.hits += 1
            return embedding
        self.cache.misses += 1
        embedding = self.model.embed(image)
        self.cache.put(key, embedding)
        return embedding
