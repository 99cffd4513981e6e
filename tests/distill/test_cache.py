import numpy as np
import torch

from distill.cache import EmbeddingCache
from tests.helpers import CountingTeacher, write_npz
from zoo.data.io import TEMP_PREFIX
from zoo.data.samples import find_samples


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
    assert not list((tmp_path / "cache").rglob(f"{TEMP_PREFIX}*"))


def test_flipped_bytes_in_teacher_embeddings_are_recomputed_to_a_clean_builds_values(tmp_path, capsys):
    from tests.helpers import flip_bytes

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        write_npz(data / f"2DBox_US_{i}.npz", imgs=rng.integers(0, 255, (30, 30, 3), dtype=np.uint8), boxes=np.array([[1, 1, 9, 9]]))
    samples = find_samples([data])
    teacher = CountingTeacher()
    cache = EmbeddingCache(tmp_path / "cache", "t")
    keys = cache.build(samples, teacher, progress=False)
    clean = [cache.get(key) for key in keys]
    flip_bytes(cache.path(keys[0]))  # an entry of 2 MB: 1 MiB of it inverted, its size unchanged
    capsys.readouterr()
    again = EmbeddingCache(tmp_path / "cache", "t")
    assert again.build(samples, teacher, progress=False) == keys
    assert (again.hits, again.misses, teacher.images) == (1, 1, 3)
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{cache.path(keys[0])}: damaged embedding-cache entry" in line
    assert all(torch.equal(again.get(key), value) for key, value in zip(keys, clean))
