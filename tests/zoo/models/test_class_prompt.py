import numpy as np
import torch

from zoo.data.io import load_case
from zoo.modalities import MODALITIES
from zoo.models.factory import build_litemedsam
from zoo.predict import ModalityChoice, segment_case


def test_zero_class_prompt_reproduces_litemedsam_masks(litemedsam, val_dir):
    """Before fine-tuning, the class-prompt model gives exactly LiteMedSAM's masks, whatever modality it is told."""
    cp = build_litemedsam(class_prompt=True)
    case = load_case(val_dir / "2DBox_CT_COVID19MedSeg_slice005.npz")
    base = segment_case(litemedsam, case, ModalityChoice(litemedsam))
    for choice in ("auto", "head", "Fundus"):
        result = segment_case(cp, case, ModalityChoice(cp, choice))
        assert np.array_equal(result.segs, base.segs)
    assert base.modality_source == "unused"
    assert segment_case(cp, case, ModalityChoice(cp, "auto")).modality == "CT"


def test_head_shapes_and_class_prompt_changes_the_decoder_input():
    torch.manual_seed(0)
    cp = build_litemedsam(class_prompt=True)
    embedding = torch.randn(1, 256, 64, 64)
    assert cp.predict_modality(embedding).shape == (1, len(MODALITIES))
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [10.0, 10.0, 60.0, 90.0]])
    with torch.no_grad():
        before = cp.decode(embedding, boxes, 3)
        cp.class_prompt.weight[3] = torch.randn(256)
        after_us = cp.decode(embedding, boxes, 3)
        after_ct = cp.decode(embedding, boxes, 0)
    assert before.shape == (2, 1, 256, 256)
    assert not torch.allclose(before, after_us)
    assert torch.allclose(before, after_ct)


def test_forward_batches_one_box_per_image(litemedsam):
    images = torch.rand(2, 3, 256, 256)
    boxes = torch.tensor([[30.0, 40.0, 120.0, 150.0], [10.0, 10.0, 60.0, 90.0]])
    with torch.no_grad():
        batched = litemedsam(images, boxes)
        single = litemedsam(images[1:], boxes[1:])
    assert batched.shape == (2, 1, 256, 256)
    assert torch.allclose(batched[1:], single, atol=1e-4)
