
import numpy as np
import pytest

from zoo.data.io import read_csv
from zoo.data.scoring import case_scores


def square(shape=(40, 40), top=10, left=10, size=10, label=1):
    mask = np.zeros(shape, np.uint8)
    mask[top : top + size, left : left + size] = label
    return mask


def test_identical_masks():
    assert case_scores(square(), square()) == (1.0, 1.0)


def test_disjoint_masks():
    assert case_scores(square(), square(left=25)) == (0.0, 0.0)


def test_one_pixel_shift_keeps_every_surface_within_tolerance():
    dsc, nsd = case_scores(square(), square(left=11))
    assert dsc == pytest.approx(2 * 90 / 200)
    assert nsd == pytest.approx(1.0)


def test_nsd_is_zero_when_dsc_is_at_most_0_2():
    dsc, nsd = case_scores(square(), square(left=19))  # overlap 1 column: DSC 0.1
    assert dsc == pytest.approx(0.1) and nsd == 0.0


def test_empty_prediction():
    assert case_scores(square(), np.zeros((40, 40), np.uint8)) == (0.0, 0.0)


def test_labels_are_averaged():
    gts = square() + square(left=25, label=2)
    segs = square()  # label 1 perfect, label 2 missed
    dsc, nsd = case_scores(gts, segs)
    assert dsc == pytest.approx(0.5) and nsd == pytest.approx(0.5)


def test_3d_uses_anisotropic_spacing():
    gts = np.zeros((20, 20, 20), np.uint8)
    gts[5:15, 5:15, 5:15] = 1
    segs = np.roll(gts, 1, axis=0)  # one slice off along z
    dsc, nsd_fine = case_scores(gts, segs, [1.0, 1.0, 1.0])
    assert dsc == pytest.approx(0.9)
    assert nsd_fine == pytest.approx(1.0)  # 1 mm apart: within the 2 mm tolerance
    _, nsd_thick = case_scores(gts, segs, [3.0, 1.0, 1.0])
    assert 0.0 < nsd_thick < 1.0  # 3 mm apart: the top and bottom faces fall outside
    with pytest.raises(ValueError, match="spacing"):
        case_scores(gts, segs)


def test_official_scores_of_the_reference_masks(val_dir, reference_dir):
    """Our metrics give the official evaluation's numbers for LiteMedSAM's official val masks (2D and 3D)."""
    official = {r["case"]: r for r in read_csv(reference_dir / "metrics.csv")}
    names = ["2DBox_CT_COVID19MedSeg_slice040.npz", "2DBox_Mammography_DDSMtissue_A0002-RIGHTMLO.npz",
             "3DBox_PET_IBSISTS_STS009.npz", "3DBox_MR_IBSISTST1_STS023.npz"]
    for name in names:
        gt = np.load(val_dir / name)
        segs = np.load(reference_dir / name)["segs"]
        dsc, nsd = case_scores(gt["gts"], segs, gt["spacing"].tolist() if gt["gts"].ndim == 3 else None)
        assert (round(dsc, 4), round(nsd, 4)) == (float(official[name]["dsc"]), float(official[name]["nsd"])), name


def test_more_than_255_labels_in_uint16():
    """A file with 300 boxes is segmented into uint16 labels (zoo.data.io.label_dtype); every one of them is scored."""
    gts = np.zeros((60, 80), np.uint16)
    for label in range(1, 301):
        row, col = divmod(label - 1, 20)
        gts[4 * row : 4 * row + 3, 4 * col : 4 * col + 3] = label
    segs = gts.copy()
    segs[segs == 300] = 0  # the last label (beyond uint8) missed: DSC 299/300
    dsc, nsd = case_scores(gts, segs)
    assert dsc == pytest.approx(299 / 300) and nsd == pytest.approx(299 / 300)
