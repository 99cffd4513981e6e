import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import flip_bytes, tiny_model
from zoo.data.io import Case
from zoo.models.weights import module_fingerprint
from zoo.predict import ModalityChoice, segment_case
from zoo.runtime import embedding_cache
from zoo.runtime.embedding_cache import CachedEncoder, EmbeddingCache, encoder_cache_id, evict_least_recent, image_key


def _volume_case():
    rng = np.random.default_rng(0)
    return Case(path=Path("3DBox_CT_x.npz"), image=rng.integers(0, 255, (6, 32, 32), dtype=np.uint8),
                boxes=np.array([[8, 8, 1, 19, 19, 4]]), gts=None, spacing=np.ones(3), modality="CT")


def test_cached_encoder_gives_the_same_masks_and_is_shared_by_equal_encoders(tmp_path):
    case = _volume_case()
    model = tiny_model()
    plain = segment_case(model, case, ModalityChoice(model)).segs
    cached = CachedEncoder(model, tmp_path)
    assert np.array_equal(segment_case(cached, case, ModalityChoice(cached)).segs, plain)
    computed = cached.cache.misses
    assert computed > 0 and len(list(tmp_path.rglob("*.emb"))) == computed

    other = tiny_model()
    other.mask_decoder.iou_token.weight.data += 1  # another decoder on the same encoder: shares the entries
    shared = CachedEncoder(other, tmp_path)
    segment_case(shared, case, ModalityChoice(shared))
    assert shared.cache.hits == computed and shared.cache.misses == 0
    assert np.array_equal(segment_case(cached, case, ModalityChoice(cached)).segs, plain)  # from the cache, float32


def test_fingerprint_changes_with_any_weight_and_buffer():
    model = tiny_model()
    base = module_fingerprint(model.image_encoder)
    assert base == tiny_model().encoder_fingerprint()
    model.image_encoder.neck[0].weight.data[0, 0, 0, 0] += 1e-6
    assert module_fingerprint(model.image_encoder) != base
    bn = next(m for m in tiny_model().image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = module_fingerprint(bn)
    bn.running_mean += 1
    assert module_fingerprint(bn) != before


def test_damaged_entry_is_reported_once_dropped_and_recomputed(tmp_path, capsys):
    cache = EmbeddingCache(tmp_path, "enc")
    key = image_key(torch.zeros(3, 256, 256))
    cache.put(key, torch.ones(256, 64, 64))
    assert cache.get(key).dtype == torch.float16
    flip_bytes(cache.path(key))
    assert cache.get(key) is None and not cache.path(key).exists()
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{cache.path(key)}: damaged embedding-cache entry (checksum mismatch)" in line
    cache.path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path(key).write_bytes(b"broken")
    assert cache.get(key) is None and not cache.path(key).exists()


def test_flipped_bytes_in_cached_embeddings_give_a_clean_runs_masks(tmp_path, capsys):
    """1 MiB of every entry inverted in place (sizes kept): the run reports and recomputes them, masks unchanged."""
    case = _volume_case()
    model = tiny_model()
    clean = segment_case(model, case, ModalityChoice(model)).segs
    cached = CachedEncoder(model, tmp_path)
    segment_case(cached, case, ModalityChoice(cached))
    entries = sorted(tmp_path.rglob("*.emb"))
    for entry in entries:
        flip_bytes(entry)
    capsys.readouterr()
    again = CachedEncoder(model, tmp_path)
    assert np.array_equal(segment_case(again, case, ModalityChoice(again)).segs, clean)
    assert again.cache.hits == 0 and again.cache.misses == len(entries)
    warnings = capsys.readouterr().err.splitlines()
    assert sorted(w.split(": damaged")[0].removeprefix("warning: ") for w in warnings) == list(map(str, entries))
    assert all(EmbeddingCache(tmp_path, again.cache.dir.name, torch.float32).get(e.name.split(".")[0]) is not None
               for e in entries)


def test_key_covers_dtype_and_runtime(tmp_path):
    key = image_key(torch.zeros(3, 256, 256))
    EmbeddingCache(tmp_path, "enc", torch.float16).put(key, torch.ones(2, 2))
    assert EmbeddingCache(tmp_path, "enc", torch.float32).get(key) is None  # fp16 entries never read as fp32
    model = tiny_model()
    ident = encoder_cache_id(model)
    assert encoder_cache_id(tiny_model().half()) != ident  # the same weights in another dtype
    model.backend = "onnxruntime"  # the same weights computed by another runtime (and its version)
    assert encoder_cache_id(model) != ident


def test_every_backend_a_variant_may_name_has_a_cache_key():
    from zoo.runtime.exported import MANIFEST_BACKENDS

    model = tiny_model()
    keys = set()
    for backend in ("pytorch", *MANIFEST_BACKENDS):  # 'inc' (a torch.export program) once had none: a KeyError
        model.backend = backend
        keys.add(encoder_cache_id(model))
    assert len(keys) == 1 + len(MANIFEST_BACKENDS)


def _encoder_folder(root: Path, name: str, megabytes: int, used_ago: float) -> Path:
    folder = root / name
    (folder / "ab").mkdir(parents=True)
    (folder / "ab" / "entry.float32.emb").write_bytes(b"\0" * (megabytes * 2**20))
    stamp = folder / embedding_cache.LAST_USED
    stamp.touch()
    os.utime(stamp, (time.time() - used_ago, time.time() - used_ago))
    return folder


def test_eviction_deletes_least_recent_encoders_until_the_cache_fits(tmp_path):
    hour = 3600
    oldest = _encoder_folder(tmp_path, "encoder-" + "1" * 16, 3, used_ago=5 * hour)
    older = _encoder_folder(tmp_path, "encoder-" + "2" * 16, 3, used_ago=4 * hour)
    recent = _encoder_folder(tmp_path, "encoder-" + "3" * 16, 3, used_ago=2 * hour)
    in_use = _encoder_folder(tmp_path, "encoder-" + "4" * 16, 3, used_ago=60)  # another run's, writing now
    opened = _encoder_folder(tmp_path, "encoder-" + "5" * 16, 3, used_ago=6 * hour)  # the oldest, but being opened
    other = _encoder_folder(tmp_path, "exported", 3, used_ago=9 * hour)  # not an encoder's folder
    deleted = evict_least_recent(tmp_path, 10 * 2**20, keep=opened.name)
    assert deleted == [oldest, older]
    assert all(f.exists() for f in (recent, in_use, opened, other)) and not oldest.exists() and not older.exists()
    assert evict_least_recent(tmp_path, 10 * 2**20, keep=opened.name) == []  # 9 MB of encoders: fits


def test_opening_a_cached_encoder_evicts_others_and_stamps_its_own(tmp_path, capsys):
    stale = _encoder_folder(tmp_path, "encoder-" + "1" * 16, 2, used_ago=3600)
    cached = CachedEncoder(tiny_model(), tmp_path, max_gb=1 / 1024)  # 1 MB
    assert not stale.exists() and f"deleted {stale} (least recently used)" in capsys.readouterr().err
    assert time.time() - (cached.cache.dir / embedding_cache.LAST_USED).stat().st_mtime < 60
    case = _volume_case()
    segment_case(cached, case, ModalityChoice(cached))
    assert cached.cache.misses > 0 and len(list(cached.cache.dir.rglob("*.emb"))) == cached.cache.misses


def test_a_nearly_full_disk_stops_caching_with_one_warning_and_the_same_masks(tmp_path, capsys, monkeypatch):
    case = _volume_case()
    model = tiny_model()
    clean = segment_case(model, case, ModalityChoice(model)).segs
    full = shutil.disk_usage(tmp_path)._replace(free=embedding_cache.MIN_FREE_BYTES - 1)
    monkeypatch.setattr(embedding_cache.shutil, "disk_usage", lambda path: full)
    cached = CachedEncoder(model, tmp_path)
    assert np.array_equal(segment_case(cached, case, ModalityChoice(cached)).segs, clean)
    assert cached.cache.misses > 1 and cached.cache.disk_full and not list(tmp_path.rglob("*.emb"))
    (warning,) = capsys.readouterr().err.splitlines()
    assert f"{cached.cache.dir}: less than 2 GB free on its disk; embeddings are no longer cached" in warning


def test_tests_keep_their_caches_out_of_the_users_home():
    """tests/conftest.py points $CP_TINYVIT_CACHE at a folder of the session's own: eviction there evicts nothing real."""
    assert embedding_cache.DEFAULT_CACHE_DIR == Path(os.environ["CP_TINYVIT_CACHE"])
    assert embedding_cache.DEFAULT_CACHE_DIR.name.startswith("cp-tinyvit-test-cache-")
    assert not embedding_cache.ENCODER_CACHE_DIR.is_relative_to(Path.home() / ".cache")


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", ""])
def test_a_bad_cache_bound_in_the_environment_is_named(value):
    with pytest.raises(ValueError, match=rf"\$CP_TINYVIT_CACHE_MAX_GB={value!r}: not a positive number of GB"):
        embedding_cache._max_gb(value)
    assert embedding_cache._max_gb("12.5") == 12.5


def test_a_folder_deleted_meanwhile_counts_as_never_used(tmp_path):
    assert embedding_cache.last_used(tmp_path / ("encoder-" + "0" * 16)) == 0.0
