"""Image embeddings kept on disk, keyed by the preprocessed image's content and by the encoder that made them.

Layout: CACHE_DIR/<encoder id>/<key[:2]>/<key>.<dtype>.emb with key = sha256(preprocessing version, preprocessed
image); the encoder id covers the encoder's weights and dtypes, its runtime and that runtime's version. An entry is
the sha256 of its .npy bytes followed by those bytes: one damaged on disk (a flipped bit reads back as a valid
array) is found on read, reported once, deleted and recomputed. Entries are written under a temporary name and
renamed, so an interrupted run leaves no half-written entry.
Distillation keeps teacher embeddings in float16 (distill.cache); benchmarks keep float32, so that a variant
scored from cached embeddings gets exactly the masks it would get without the cache.

The cache is bounded, since float32 entries of every exported encoder add up (a volume's slices are 4 MB each; a
day of boards filled 65 GB): opening an encoder's cache (CachedEncoder) first deletes the folders of the encoders
used least recently until the whole is at most CACHE_MAX_GB, and an entry is not written while the disk has less
than MIN_FREE_BYTES free (said once; the embedding is still returned, so scores do not change).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from zoo.data.io import atomic_path
from zoo.runtime.backends import runtime_version

PREPROCESSING_VERSION = b"longest-side-256-inter-area/minmax/pad-bottom-right/v1"
DEFAULT_CACHE_DIR = Path(os.environ.get("CP_TINYVIT_CACHE", Path.home() / ".cache" / "cp-tinyvit"))
ENCODER_CACHE_DIR = DEFAULT_CACHE_DIR / "encoders"  # CachedEncoder's float32 entries (benchmarks, validation)


def _max_gb(value: str) -> float:
    try:
        gb = float(value)
    except ValueError:
        gb = float("nan")
    if not gb > 0:
        raise ValueError(f"$CP_TINYVIT_CACHE_MAX_GB={value!r}: not a positive number of GB")
    return gb


CACHE_MAX_GB = _max_gb(os.environ.get("CP_TINYVIT_CACHE_MAX_GB", "24"))  # ~2 encoders' entries of every val case
MIN_FREE_BYTES = 2 * 2**30  # entries stop being written below this much free disk: a full disk fails everything else
IN_USE_SECONDS = 600  # a folder written to this recently is another run's, in use: never evicted
LAST_USED = ".last-used"  # touched when a folder is opened or written to: eviction goes least recent first
ENCODER_FOLDER = re.compile(r"^encoder-[0-9a-f]{16}$")  # encoder_cache_id's names: nothing else is ever evicted


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


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (files deleted meanwhile by another run count 0)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:
            pass
    return total


def last_used(folder: Path) -> float:
    """When an encoder folder was last opened or written to (its stamp; the folder's own time before stamps)."""
    try:
        stamp = folder / LAST_USED
        return (stamp if stamp.exists() else folder).stat().st_mtime
    except FileNotFoundError:  # deleted meanwhile by another run's eviction
        return 0.0


def evict_least_recent(root: Path, max_bytes: float, keep: str) -> list[Path]:
    """Delete whole encoder folders under `root`, least recently used first, until the cache holds at most
    `max_bytes`. Never `keep` (the encoder being opened), a folder used in the last IN_USE_SECONDS (another run's)
    or anything not named as encoder_cache_id names folders. Returns the folders deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [f for f in root.iterdir() if f.is_dir() and ENCODER_FOLDER.match(f.name)]
    sizes = {f: folder_bytes(f) for f in folders}
    used = {f: last_used(f) for f in folders}  # read once: the order and the in-use test agree
    total = sum(sizes.values())
    now, deleted = time.time(), []
    for folder in sorted(folders, key=used.get):
        if total <= max_bytes:
            break
        if folder.name == keep or now - used[folder] < IN_USE_SECONDS:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
        deleted.append(folder)
    return deleted


class EmbeddingCache:
    """Embeddings of one encoder (`encoder_id` names its folder) stored as `dtype`."""

    def __init__(self, root: Path, encoder_id: str, dtype: torch.dtype = torch.float16):
        self.dir = Path(root) / encoder_id
        self.dtype = dtype
        self.hits = 0
        self.misses = 0
        self.disk_full = False  # set once the disk had less than MIN_FREE_BYTES free: nothing more is written
        self._stamped = 0.0

    def touch(self) -> None:
        """Mark this encoder's folder as used now (eviction goes least recent first; at most once a minute)."""
        now = time.time()
        if now - self._stamped >= 60:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / LAST_USED).touch()
            self._stamped = now

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
        self.touch()
        return torch.from_numpy(array)

    def _discard(self, path: Path, problem: str) -> None:
        print(f"warning: {path}: damaged embedding-cache entry ({problem}); deleted, it is computed again",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        return None

    def put(self, key: str, embedding: torch.Tensor) -> None:
        """Store `key`'s embedding, unless the disk is nearly full (then warn once and store nothing more)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.disk_full and shutil.disk_usage(self.dir).free < MIN_FREE_BYTES:
            self.disk_full = True
            print(f"warning: {self.dir}: less than {MIN_FREE_BYTES / 2**30:.0f} GB free on its disk; embeddings are "
                  "no longer cached (they are computed each time: same results, slower)", file=sys.stderr)
        if self.disk_full:
            return
        self.touch()
        buffer = io.BytesIO()
        np.save(buffer, embedding.to(self.dtype).cpu().numpy(), allow_pickle=False)
        payload = buffer.getvalue()
        with atomic_path(self.path(key)) as tmp:
            tmp.write_bytes(hashlib.sha256(payload).digest() + payload)


class CachedEncoder:
    """Any model variant (zoo.runtime.interface's protocol) whose embed() is looked up in a float32 EmbeddingCache first.

    Variants with the same encoder weights (say LiteMedSAM and a class-prompt model fine-tuned on its frozen
    encoder) share entries, so a benchmark embeds each image once. Everything else is the wrapped model's. Opening it
    first deletes the least recently used other encoders' folders until the cache is at most `max_gb`
    (evict_least_recent)."""

    def __init__(self, model, root: Path, max_gb: float = CACHE_MAX_GB):
        self.model = model
        self.cache = EmbeddingCache(root, encoder_cache_id(model), torch.float32)
        for folder in evict_least_recent(root, max_gb * 2**30, keep=self.cache.dir.name):
            print(f"embedding cache over {max_gb:g} GB: deleted {folder} (least recently used)", file=sys.stderr)
        self.cache.touch()

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
