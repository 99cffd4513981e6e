"""Teacher embeddings computed once and kept on disk in float16, keyed by image content, preprocessing and teacher.

Layout: CACHE_DIR/<teacher id>/<key[:2]>/<key>.npy with key = sha256(preprocessed image, preprocessing version).
Files are written under a temporary name and renamed, so an interrupted build leaves no half-written entry and
simply resumes: entries already there are skipped.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distill.data import Sample, sample_tensor
from zoo.io import atomic_path

PREPROCESSING_VERSION = b"longest-side-256-inter-area/minmax/pad-bottom-right/v1"
DEFAULT_CACHE_DIR = Path(os.environ.get("CP_TINYVIT_CACHE", Path.home() / ".cache" / "cp-tinyvit"))


def image_key(image: torch.Tensor) -> str:
    """Content key of a preprocessed (3, 256, 256) image."""
    digest = hashlib.sha256(PREPROCESSING_VERSION)
    digest.update(image.contiguous().numpy().tobytes())
    return digest.hexdigest()


class EmbeddingCache:
    def __init__(self, root: Path, teacher_id: str):
        self.dir = Path(root) / teacher_id
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
            np.save(handle, embedding.to(torch.float16).cpu().numpy(), allow_pickle=False)

    @torch.inference_mode()
    def build(self, samples: list[Sample], teacher, device: str = "cpu", batch_size: int = 4,
              progress: bool = True) -> list[str]:
        """Keys of every sample's image, computing the missing teacher embeddings (in batches)."""
        keys, pending = [], []

        def flush():
            if pending:
                embeddings = teacher.embed(torch.stack([image for _, image in pending]).to(device))
                for (key, _), embedding in zip(pending, embeddings):
                    self.put(key, embedding)
                pending.clear()

        bar = tqdm(samples, desc="teacher embeddings", unit="img", disable=not progress)
        for sample in bar:
            image = sample_tensor(sample)
            key = image_key(image)
            keys.append(key)
            if self.path(key).is_file() or any(key == k for k, _ in pending):
                self.hits += 1
            else:
                self.misses += 1
                pending.append((key, image))
                if len(pending) == batch_size:
                    flush()
            bar.set_postfix(cached=self.hits, computed=self.misses)
        flush()
        return keys
