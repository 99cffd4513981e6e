import numpy as np
import pytest
import torch

from tests.helpers import write_npz
from zoo.data.io import CaseError
from zoo.data.samples import (
    balanced_weights,
    find_samples,
    flip,
    flip_box,
    flip_point,
    parse_fractions,
    sample_box,
    sample_object,
    sample_tensor,
)


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        gts = np.zeros((40, 50), np.uint8)
        gts[5:20, 10:30] = 1
        write_npz(tmp_path / f"2DBox_US_{i}.npz", imgs=rng.integers(0, 255, (40, 50, 3), dtype=np.uint8),
                  boxes=np.array([[10, 5, 29, 19]]), gts=gts)
    write_npz(tmp_path / "3DBox_CT_0.npz", imgs=rng.integers(0, 255, (12, 30, 30), dtype=np.uint8),
              boxes=np.array([[2, 2, 1, 20, 20, 10]]))  # no gts: fine for distillation
    return tmp_path


def test_2d_images_and_every_fifth_slice(data_dir):
    samples = find_samples([data_dir])
    assert sorted((s.path.name, s.z) for s in samples if s.z is not None) == [("3DBox_CT_0.npz", z) for z in (0, 5, 10)]
    assert sum(s.z is None for s in samples) == 4
    assert sample_tensor(samples[0]).shape == (3, 256, 256)


def test_fractions_and_balance(data_dir):
    assert parse_fractions("CT=0.02,default=0.1") == {"default": 0.1, "CT": 0.02}
    samples = find_samples([data_dir], fractions=parse_fractions("US=0.5"), seed=1)
    assert sum(s.modality == "US" for s in samples) == 2 and sum(s.modality == "CT" for s in samples) == 3
    assert find_samples([data_dir], fractions=parse_fractions("US=0.5"), seed=1) == samples
    weights = balanced_weights(samples)
    assert weights[[s.modality == "US" for s in samples]].sum() == pytest.approx(1.0)
    assert weights[[s.modality == "CT" for s in samples]].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        parse_fractions("CT=2")


def test_gt_box_at_256_scale(data_dir):
    samples = find_samples([data_dir])
    us = next(s for s in samples if s.modality == "US")
    assert sample_box(us, torch.Generator().manual_seed(0)).tolist() == [51.0, 25.0, 148.0, 97.0]
    ct = next(s for s in samples if s.modality == "CT")
    assert sample_box(ct, torch.Generator()) is None


def test_jittered_box_moves_each_side_within_bounds(data_dir):
    us = next(s for s in find_samples([data_dir]) if s.modality == "US")
    tight = np.array([51.0, 25.0, 148.0, 97.0])
    boxes = np.stack([sample_box(us, torch.Generator().manual_seed(seed), jitter=4).numpy() for seed in range(40)])
    assert np.abs(boxes - tight).max() <= 4
    assert (boxes < tight).any(axis=0).all() and (boxes > tight).any(axis=0).all()  # inwards and outwards
    assert (sample_box(us, torch.Generator().manual_seed(3), jitter=4) == sample_box(us, torch.Generator().manual_seed(3), jitter=4)).all()


def test_sample_object_is_the_box_and_mask_of_one_label(tmp_path):
    gts = np.zeros((40, 50), np.uint8)
    gts[5:20, 10:30] = 1
    gts[25:38, 2:8] = 2
    write_npz(tmp_path / "2DBox_US_0.npz", imgs=np.zeros((40, 50, 3), np.uint8),
              boxes=np.array([[10, 5, 29, 19], [2, 25, 7, 37]]), gts=gts)
    us = find_samples([tmp_path])[0]
    chosen = set()
    for seed in range(8):
        box, mask = sample_object(us, torch.Generator().manual_seed(seed))
        assert (box == sample_box(us, torch.Generator().manual_seed(seed))).all()  # the same draws
        assert mask.shape == (1, 256, 256) and set(mask.unique().tolist()) == {0.0, 1.0}
        rows, cols = np.nonzero(mask[0].numpy())
        # the mask is the box's object: its extent at 256 scale is the box, within one source pixel (256 / 50 px)
        assert np.abs(np.array([cols.min(), rows.min(), cols.max(), rows.max()]) - box.numpy()).max() <= 256 / 50 + 1
        chosen.add(tuple(box.tolist()))
    assert len(chosen) == 2  # both labels get drawn


def test_bad_data_directories(tmp_path):
    with pytest.raises(CaseError, match="absent: no such directory"):
        find_samples([tmp_path / "absent"])
    with pytest.raises(CaseError, match="no .npz files"):
        find_samples([tmp_path])
    (tmp_path / "2DBox_US_broken.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(CaseError, match="2DBox_US_broken.npz: not a readable npz"):
        find_samples([tmp_path])


def test_flip_point_flips_as_flip_flips_an_image_and_flip_box_a_box():
    image = torch.zeros(1, 256, 256)
    image[0, 30, 200] = 1  # row 30, column 200: the point (x 200, y 30)
    for horizontal, vertical in ((True, False), (False, True), (True, True)):
        (row, col), = torch.nonzero(flip(image, horizontal, vertical)[0]).tolist()
        assert flip_point(200, 30, horizontal, vertical) == (col, row)
        assert flip_point(*flip_point(200, 30, horizontal, vertical), horizontal, vertical) == (200, 30)
        box = flip_box(torch.tensor([200.0, 30.0, 220.0, 40.0]), horizontal, vertical).tolist()
        assert flip_point(200, 30, horizontal, vertical) in ((box[0], box[1]), (box[2], box[1]), (box[0], box[3]),
                                                             (box[2], box[3]))
