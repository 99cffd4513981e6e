"""CPU latency of a model through the shared inference path: each component timed apart, median of repeats."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from zoo.data.io import Case
from zoo.data.preprocess import IMAGE_SIZE
from zoo.predict import ModalityChoice, segment_case


def _median_seconds(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


LATENCY_VOLUME = (24, 256, 256)  # slices, height, width
LATENCY_BOX_3D = [60.0, 70.0, 6.0, 180.0, 200.0, 17.0]  # x0, y0, z0, x1, y1, z1: 12 slices to segment


def measure_latency(model, repeats: int = 5, warmup: int = 2, seed: int = 0) -> dict[str, float]:
    """encoder_ms (one 256² image), decoder_ms_per_box, latency_2d_ms (a 256² image with one box, from the
    uint8 image through preprocessing, encoder, decoder and postprocessing to the label map) and latency_3d_s
    (a 24×256×256 volume with one box over 12 slices, propagated as zoo.predict does)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    case = Case(path=Path("2DBox_CT_latency.npz"), image=image,
                boxes=np.array([[60.0, 70.0, 180.0, 200.0]]), gts=None, spacing=np.ones(2), modality="CT")
    modalities = ModalityChoice(model)
    tensor = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    boxes = torch.tensor([[60.0, 70.0, 180.0, 200.0]])
    with torch.inference_mode():
        embedding = model.embed(tensor)  # the encoder's first warm-up run
        encoder = _median_seconds(lambda: model.embed(tensor), repeats, max(warmup - 1, 0))
        decoder = _median_seconds(lambda: model.decode(embedding, boxes, 0), repeats, warmup)
    # The parts timed above have warmed the model up: the whole path is timed without a warm-up run of its own.
    end_to_end = _median_seconds(lambda: segment_case(model, case, modalities), repeats, warmup=0)
    volume = Case(path=Path("3DBox_CT_latency.npz"), image=rng.integers(0, 256, LATENCY_VOLUME, dtype=np.uint8),
                  boxes=np.array([LATENCY_BOX_3D]), gts=None, spacing=np.ones(3), modality="CT")
    # One run: it already averages 12 slices, and the 2D timings above have warmed the model up.
    end_to_end_3d = _median_seconds(lambda: segment_case(model, volume, modalities), repeats=1, warmup=0)
    return {"latency_2d_ms": end_to_end * 1e3, "encoder_ms": encoder * 1e3, "decoder_ms_per_box": decoder * 1e3,
            "latency_3d_s": end_to_end_3d}
