import numpy as np
import torch

from distill.cache import EmbeddingCache
from distill.data import find_samples
from tests.helpers import CountingTeacher, write_npz
from zoo.embedding_cache import image_key


def test_build_computes_misses_once_then_hits(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        write_npz(data / f"2DBox_US_{i}.npz", imgs=rng.integers(0, 255, (30, 30, 3), dtype=np.uint8), boxes=np.array([[1, 1, 9, 9]]))
    image = rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)
    write_npz(data / "2DBox_US_dup_a.npz", imgs=image, boxes=np.array([[1, 1, 9, 9]]))
    write_npz(data / "2DBox_US_dup_b.npz", imgs=image, boxes=np.array([[2, 2, 9, 9]]))  # same content
    samples = find_samples([data])
    teacher = CountingTeacher()
    cache = EmbeddingCache(tmp_path / "cache", "teacher-a")
    keys = cache.build(samples, teacher, batch_size=2, progress=False)
    assert teacher.images == 4 and cache.misses == 4 and cache.hits == 1  # the duplicate image is computed once
    embedding = cache.get(keys[0])
    assert embedding.dtype == torch.float16 and embedding.shape == (256, 64, 64)
    again = EmbeddingCache(tmp_path / "cache", "teacher-a")
    assert again.build(samples, teacher, progress=False) == keys
    assert teacher.images == 4 and again.hits == 5
    other = EmbeddingCache(tmp_path / "cache", "teacher-b")  # another teacher never shares entries
    other.build(samples, teacher, progress=False)
    assert other.misses == 4
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_damaged_entry_is_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path, "t")
    key = image_key(torch.zeros(3, 256, 256))
    cache.put(key, torch.ones(256, 64, 64))
    cache.path(key).write_bytes(b"garbage")
    assert cache.get(key) is None and not cache.path(key).exists()
