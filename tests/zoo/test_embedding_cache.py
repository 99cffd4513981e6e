from pathlib import Path

import numpy as np
import torch

from tests.helpers import tiny_model
from zoo.embedding_cache import CachedEncoder, EmbeddingCache, image_key, module_fingerprint
from zoo.io import Case
from zoo.predict import ModalityChoice, segment_case


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
    assert computed > 0 and len(list(tmp_path.rglob("*.npy"))) == computed

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


def test_damaged_entry_is_dropped_and_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path, "enc")
    key = image_key(torch.zeros(3, 256, 256))
    cache.put(key, torch.ones(2, 2))
    assert cache.get(key).dtype == torch.float16
    cache.path(key).write_bytes(b"broken")
    assert cache.get(key) is None and not cache.path(key).exists()
