"""Image embeddings kept on disk, keyed by the preprocessed image's content and by the encoder that made them.

Layout: CACHE_DIR/<encoder id>/<key[:2]>/<key>.<dtype>.emb with key = sha256(preprocessing version, preprocessed
image); the encoder id covers the encoder's weights and dtypes, its runtime and that runtime's version. An entry is
the sha256 of its .npy bytes followed by those bytes: one damaged on disk (a flipped bit reads back as a valid
array) is found on read, reported once, deleted and recomputed. Entries are written under a temporary name and
renamed, so an interrupted run leaves no half-written entry.
Distillation keeps teacher embeddings in float16 (distill.cache); benchmarks keep float32, so that a variant
scored from cached embeddings gets exactly the masks it would get without the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch

from zoo.data.io import atomic_path
from zoo.runtime.backends import runtime_version

PREPROCESSING_VERSION = b"longest-side-256-inter-area/minmax/pad-bottom-right/v1"
DEFAULT_CACHE_DIR = Path(os.environ.get("CP_TINYVIT_CACHE", Path.home() / ".cache" / "cp-tinyvit"))
ENCODER_CACHE_DIR = DEFAULT_CACHE_DIR / "encoders"  # CachedEncoder's float32 entries (benchmarks, validation)


def image_key(image: torch.Tensor) -> str:
    """Content key of a preprocessed (3, 256, 256) or (1, 3, 256, 256) image."""
    digest = hashlib.sha256(PREPROCESSING_VERSION)
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_cache_id(model) -> str:
    """The cache folder of a model's encoder: LiteMedSAM and every model fine-tuned on its frozen encoder share it.

    The fingerprint covers weights, dtypes and (exported models) the precision computed in; the runtime and its
    version are added because another version may compute slightly different embeddings from the same weights."""
    runtime = f"{model.backend}-{runtime_version(model.backend)}"
    return f"encoder-{hashlib.sha256(f'{model.encoder_fingerprint()}|{runtime}'.encode()).hexdigest()[:16]}"


class EmbeddingCache:
    """Embeddings of one encoder (`encoder_id` names its folder) stored as `dtype`."""

    def __init__(self, root: Path, encoder_id: str, dtype: torch.dtype = torch.float16):
        self.dir = Path(root) / encoder_id
        self.dtype = dtype
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.{str(self.dtype).removeprefix('torch.')}.emb"

    def get(self, key: str) -> torch.Tensor | None:
        """The entry of `key`, or None when there is none or it is damaged (then it is reported and deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            return self._discard(path, err.strerror or str(err))
        digest, payload = data[:32], data[32:]
        if hashlib.sha256(payload).digest() != digest:
            return self._discard(path, "checksum mismatch")
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            return self._discard(path, f"unreadable ({err})")
        if array.dtype != np.dtype(str(self.dtype).removeprefix("torch.")):
            return self._discard(path, f"holds {array.dtype}, not {self.dtype}")
        return torch.from_numpy(array)

    def _discard(self, path: Path, problem: str) -> None:
        print(f"warning: {path}: damaged embedding-cache entry ({problem}); deleted, it is computed again",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        buffer = io.BytesIO()
        np.save(buffer, embedding.to(self.dtype).cpu().numpy(), allow_pickle=False)
        payload = buffer.getvalue()
        with atomic_path(self.path(key)) as tmp:
            tmp.write_bytes(hashlib.sha256(payload).digest() + payload)


class CachedEncoder:
    """Any model variant (zoo.runtime.interface's protocol) whose embed() is looked up in a float32 EmbeddingCache first.

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
