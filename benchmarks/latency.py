"""CPU latency of a model through the shared inference path, at steady state, each component timed apart; and the
first call, timed apart, which is what one `zoo.segment` run pays.

Steady state, the rule: a part runs again and again until the median of its last WINDOW runs is within TOLERANCE of
the median of the WINDOW runs before them (at least 2 * WINDOW runs), or until its time budget is spent; its latency
is the median of its last WINDOW runs. OpenVINO's first few dozen inferences are slower (a one-case run timed an INT8
encoder at 32 ms, a ten-case run at 18 ms): one warm-up run is not enough, and a latency must not depend on how many
cases were segmented before it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from zoo.data.io import Case
from zoo.data.preprocess import IMAGE_SIZE
from zoo.predict import ModalityChoice, segment_case

WINDOW = 5
TOLERANCE = 0.05
BUDGET_S = 30.0  # per part; a part that is not stable by then is reported with its last runs, and named unstable
MAX_RUNS = 300
LATENCY_VOLUME = (24, 256, 256)  # slices, height, width
LATENCY_BOX_3D = [60.0, 70.0, 6.0, 180.0, 200.0, 17.0]  # x0, y0, z0, x1, y1, z1: 12 slices to segment
LATENCY_BOX_2D = [60.0, 70.0, 180.0, 200.0]


def steady_seconds(fn, window: int = WINDOW, tolerance: float = TOLERANCE, budget_s: float = BUDGET_S,
                   max_runs: int = MAX_RUNS) -> tuple[float, int, bool]:
    """(median seconds of fn's last `window` runs, runs made, whether they were stable by the rule above)."""
    times: list[float] = []
    started = time.perf_counter()
    while True:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 2 * window:
            last, before = statistics.median(times[-window:]), statistics.median(times[-2 * window : -window])
            if abs(last - before) <= tolerance * before:
                return last, len(times), True
        if time.perf_counter() - started > budget_s or len(times) >= max_runs:
            return statistics.median(times[-window:]), len(times), False


def latency_cases(seed: int = 0) -> tuple[Case, Case]:
    """The fixed inputs every model is timed on: a 256² RGB image with one box, and a 24×256×256 volume with one box
    over 12 slices (random intensities: the work does not depend on them)."""
    rng = np.random.default_rng(seed)
    image = Case(path=Path("2DBox_CT_latency.npz"), image=rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
                 boxes=np.array([LATENCY_BOX_2D]), gts=None, spacing=np.ones(2), modality="CT")
    volume = Case(path=Path("3DBox_CT_latency.npz"), image=rng.integers(0, 256, LATENCY_VOLUME, dtype=np.uint8),
                  boxes=np.array([LATENCY_BOX_3D]), gts=None, spacing=np.ones(3), modality="CT")
    return image, volume


def first_call_ms(model) -> float:
    """One 2D case (the fixed image and box) on a model that has segmented nothing yet, in ms: what a single
    `zoo.segment` of one image pays after loading."""
    image, _ = latency_cases()
    start = time.perf_counter()
    segment_case(model, image, ModalityChoice(model))
    return (time.perf_counter() - start) * 1e3


def measure_latency(model, budget_s: float = BUDGET_S, seed: int = 0) -> dict[str, float | int | bool]:
    """At steady state: encoder_ms (one 256² image), decoder_ms_per_box, latency_2d_ms (the fixed 2D case from the
    uint8 image through preprocessing, encoder, decoder and postprocessing to the label map); latency_3d_s (the fixed
    volume, propagated as zoo.predict does: one run once the 2D path is steady, as it already averages 12 slices);
    warmup_runs (the 2D path's runs until steady) and latency_stable (every part met the rule within its budget)."""
    image, volume = latency_cases(seed)
    modalities = ModalityChoice(model)
    tensor = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    boxes = torch.tensor([LATENCY_BOX_2D])
    with torch.inference_mode():
        embedding = model.embed(tensor)
        encoder, _, encoder_stable = steady_seconds(lambda: model.embed(tensor), budget_s=budget_s)
        decoder, _, decoder_stable = steady_seconds(lambda: model.decode(embedding, boxes, 0), budget_s=budget_s)
    end_to_end, runs, stable = steady_seconds(lambda: segment_case(model, image, modalities), budget_s=budget_s)
    start = time.perf_counter()
    segment_case(model, volume, modalities)
    end_to_end_3d = time.perf_counter() - start
    return {"latency_2d_ms": end_to_end * 1e3, "encoder_ms": encoder * 1e3, "decoder_ms_per_box": decoder * 1e3,
            "latency_3d_s": end_to_end_3d, "warmup_runs": runs, "latency_stable": encoder_stable and decoder_stable and stable}
