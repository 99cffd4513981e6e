"""zoo.validate's interactive protocol per slice: per-step scores, AUCs, and the box-free start."""

import numpy as np
import pytest

from tests.helpers import write_npz
from tests.zoo.test_interactive import ClickingRuntime
from zoo.data.samples import find_samples
from zoo.validate import score_samples_clicks


def test_the_protocol_per_slice_scores_every_step_and_a_box_free_start(tmp_path):
    image = np.zeros((64, 64), np.uint8)
    image[10:40, 10:40] = 200
    image[18:30, 18:30] = 60  # the box's mask misses this hole (the largest error): the first click fills part of it
    gts = np.zeros((64, 64), np.uint8)
    gts[10:40, 10:40] = 1
    write_npz(tmp_path / "2DBox_US_a.npz", imgs=np.stack([image] * 3, -1), gts=gts, boxes=np.array([[9, 9, 40, 40]]))
    samples = find_samples([tmp_path], foreground_only=True)
    result = score_samples_clicks(ClickingRuntime(), samples, clicks=2, progress=False)
    (dsc0, _), (dsc1, _), (dsc2, _) = result["per_modality"]["US"]["steps"]
    assert dsc0 < dsc1 and result["dsc_auc"] == pytest.approx((dsc1 + dsc2) / 2)
    assert result["score"] == pytest.approx((result["dsc_auc"] + result["nsd_auc"]) / 2)
    free = score_samples_clicks(ClickingRuntime(), samples, clicks=2, progress=False, box_free=True)
    steps = free["per_modality"]["US"]["steps"]
    assert len(steps) == 3 and steps[1][0] > steps[0][0]  # the whole image, then a click at the centre (in the hole)
