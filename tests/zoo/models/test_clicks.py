"""zoo.models.clicks: one padding for every backend, and ClassPromptSAM's click decode built on it."""

import pytest
import torch

from tests.helpers import tiny_model
from zoo.models.clicks import MAX_POINTS, pad_clicks


def test_clicks_are_padded_to_max_points_with_not_a_point_and_a_missing_mask_is_flagged():
    padded = pad_clicks(2, torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]]]), torch.tensor([[1.0], [0.0]]))
    assert padded["points"].shape == (2, MAX_POINTS, 2) and padded["point_labels"].shape == (2, MAX_POINTS)
    assert padded["point_labels"].tolist() == [[1, -1, -1, -1, -1], [0, -1, -1, -1, -1]]
    assert padded["points"][:, 1:].abs().sum() == 0  # SAM's ONNX padding: the point (0, 0), labelled -1
    assert padded["has_mask_input"].tolist() == [0.0] and padded["mask_input"].abs().sum() == 0
    shared = pad_clicks(3, torch.tensor([[5.0, 6.0]]), torch.tensor([1.0]), torch.ones(1, 1, 256, 256))
    assert shared["points"][:, 0].tolist() == [[5.0, 6.0]] * 3 and shared["has_mask_input"].tolist() == [1.0]
    assert shared["mask_input"].shape == (3, 1, 256, 256)
    empty = pad_clicks(1, mask_input=torch.zeros(1, 1, 256, 256))  # a mask prompt alone
    assert (empty["point_labels"] == -1).all() and empty["has_mask_input"].item() == 1


def test_more_clicks_than_the_graphs_take_keep_the_latest():
    points = torch.arange(14, dtype=torch.float32).reshape(1, 7, 2)
    labels = torch.tensor([[1.0, 0, 1, -1, 1, 0, 1]])  # six real clicks, one padding among them
    padded = pad_clicks(1, points, labels)
    assert padded["point_labels"].tolist() == [[0, 1, 1, 0, 1]]
    assert padded["points"][0, :, 0].tolist() == [2.0, 4.0, 8.0, 10.0, 12.0]


@pytest.mark.parametrize("points, labels, problem", [
    (torch.zeros(1, 2, 2), None, "point_labels"),
    (torch.zeros(1, 2, 2), torch.zeros(1, 3), "need point_labels"),
    (torch.zeros(2, 2, 2), torch.zeros(2, 2), "N=1"),
    (torch.zeros(1, 2, 2), torch.tensor([[1.0, 2.0]]), "must be 1"),
])
def test_shapes_and_labels_that_do_not_fit_are_refused(points, labels, problem):
    with pytest.raises(ValueError, match=problem):
        pad_clicks(1, points, labels)


def test_the_click_prompt_is_sams_prompt_encoder_and_the_class_prompt_stays_on_the_box():
    model = tiny_model()
    boxes = torch.tensor([[10.0, 20.0, 120.0, 140.0], [30.0, 30.0, 90.0, 200.0]])
    for mask in (None, torch.randn(2, 1, 256, 256)):
        padded = pad_clicks(2, torch.tensor([[[60.0, 70.0], [5.0, 5.0]], [[100.0, 90.0], [0.0, 0.0]]]),
                            torch.tensor([[1.0, 0.0], [0.0, -1.0]]), mask)
        with torch.no_grad():
            ours = model.click_prompts(boxes, *padded.values())
            sams = model.prompt_encoder(points=(padded["points"], padded["point_labels"]), boxes=boxes[:, None], masks=mask)
        assert torch.equal(ours[0], sams[0]) and torch.equal(ours[1], sams[1])
    embedding = torch.randn(1, 256, 64, 64)
    with torch.no_grad():
        box_only = model.decode(embedding, boxes, 3)
        clicked = model.decode(embedding, boxes, 3, points=torch.tensor([[[60.0, 70.0]]] * 2),
                               point_labels=torch.ones(2, 1))
        other_modality = model.decode(embedding, boxes, 5, points=torch.tensor([[[60.0, 70.0]]] * 2),
                                      point_labels=torch.ones(2, 1))
        assert box_only.shape == clicked.shape == (2, 1, 256, 256) and not torch.allclose(box_only, clicked)
        assert not torch.allclose(clicked, other_modality)  # the class prompt still reaches the decoder
        # padded by hand or by decode: the same graph input, the same answer
        padded = pad_clicks(2, torch.tensor([[[60.0, 70.0]]] * 2), torch.ones(2, 1))
        assert torch.equal(model.decode_clicks(embedding, boxes, torch.tensor([3, 3]), *padded.values()), clicked)
