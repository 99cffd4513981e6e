import pytest

from zoo.modalities import MODALITIES, canonical_modality, modality_from_name, modality_id


def test_eleven_modalities_in_paper_order():
    assert MODALITIES == ("CT", "MR", "PET", "US", "X-Ray", "Dermoscopy", "Endoscopy", "Fundus",
                          "Microscopy", "OCT", "Mammography")


@pytest.mark.parametrize("name, expected", [
    ("2DBox_US_0525.npz", "US"),
    ("3DBox_CT_0566.npz", "CT"),
    ("2DBox_Dermoscopy_PH2_IMD002.npz", "Dermoscopy"),
    ("2DBox_XRay_0001.npz", "X-Ray"),
    ("2DBox_X-Ray_DC1000_12.npz", "X-Ray"),
    ("3DBox_PET_IBSISTS_STS_001.npz", "PET"),
    ("3DBox_MR_BraTS2013_pat0002_1_Flair.npz", "MR"),
    ("/some/dir/2DBox_OCT_0001.npz", "OCT"),
    ("case_0001.npz", None),
    ("2DBox_Unknownmodality_1.npz", None),
])
def test_modality_from_name(name, expected):
    assert modality_from_name(name) == expected


def test_spellings_and_ids():
    assert canonical_modality("x-ray") == canonical_modality("XRAY") == "X-Ray"
    assert modality_id("Mammography") == 10
    with pytest.raises(ValueError, match="unknown modality"):
        modality_id("Sonar")
