"""zoo.interactive: the simulated click (where it lands, which sign, the seeded tie-break), the AUC, and a case
refined click by click (2D and 3D, with a stand-in model whose clicks act exactly)."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.conftest import BrightRuntime
from tests.helpers import tiny_model
from zoo.data.io import Case
from zoo.interactive import (
    INWARD_CARRY,
    Click,
    Frame,
    Refinement,
    box_fill,
    click_crop,
    component_distance,
    focus_window,
    interaction_auc,
    next_click,
    resample_logits,
    zoom_window,
)
from zoo.predict import ModalityChoice, segment_case


def test_a_click_lands_at_the_centre_of_the_largest_error_component():
    truth = np.zeros((60, 80), bool)
    truth[10:50, 10:50] = True
    prediction = truth.copy()
    prediction[20:31, 20:31] = False  # missed object: 121 pixels, centred at (25, 25)
    prediction[40:45, 60:65] = True  # false object: 25 pixels
    click = next_click(prediction, truth)
    assert click == Click((25, 25), True)
    components, _ = ndimage.label(prediction != truth)
    assert components[click.position] == components[25, 25]  # inside the largest component, at its EDT maximum


def test_missed_object_gives_a_positive_click_and_false_object_a_negative_one():
    truth = np.zeros((40, 40), bool)
    truth[5:15, 5:15] = True
    over = truth.copy()
    over[20:35, 20:35] = True  # the largest error is false object
    click = next_click(over, truth)
    assert not click.positive and not truth[click.position] and over[click.position]
    under = np.zeros_like(truth)
    click = next_click(under, truth)  # everything missed
    assert click.positive and truth[click.position] and click.position in {(9, 9), (9, 10), (10, 9), (10, 10)}
    assert next_click(truth, truth) is None  # nothing left to correct


def test_the_image_border_is_a_boundary_and_equal_maxima_are_broken_by_the_seeded_draw():
    truth = np.zeros((20, 30), bool)
    truth[:, :8] = True  # a band along the left border, 8 wide: its centre is column 3 or 4, not column 0
    distance = component_distance(truth)
    assert distance[:, 0].max() == 1 and distance.max() == 4
    maxima = np.argwhere(distance == distance.max())
    assert len(maxima) > 1  # many equal maxima along the band
    expected = tuple(maxima[np.random.RandomState(42).choice(len(maxima))])  # the CVPR 2025 script's draw
    assert next_click(np.zeros_like(truth), truth).position == expected
    assert next_click(np.zeros_like(truth), truth).position == expected  # deterministic
    other = tuple(maxima[np.random.RandomState(7).choice(len(maxima))])
    assert next_click(np.zeros_like(truth), truth, seed=7).position == other


def test_3d_components_join_through_corners_and_the_click_is_3d():
    truth = np.zeros((10, 20, 20), bool)
    prediction = truth.copy()
    prediction[1:4, 1:4, 1:4] = True  # 27 voxels of false object
    prediction[4, 4, 4] = True  # touching only by a corner: the same component under 26-connectivity
    truth[6:9, 10:14, 10:14] = True  # 48 voxels missed: the largest
    click = next_click(prediction, truth)
    assert len(click.position) == 3 and click.positive and click.position[0] == 7
    truth[6:9, 10:14, 10:14] = False
    assert next_click(prediction, truth).position == (2, 2, 2)  # 28 voxels, its centre


def test_auc_is_the_trapezoid_under_the_click_steps_as_the_cvpr_2025_script():
    # a 3-step toy: the box, then 2 clicks; the script integrates the last `clicks` scores with unit steps
    assert interaction_auc([0.5, 0.7, 0.9], clicks=2) == pytest.approx((0.7 + 0.9) / 2)
    assert interaction_auc([0.2, 0.6, 0.7, 0.8, 0.9, 1.0]) == pytest.approx(0.6 / 2 + 0.7 + 0.8 + 0.9 + 1.0 / 2)
    assert interaction_auc([1.0] * 6) == pytest.approx(4.0)  # the most 5 clicks can give
    assert interaction_auc([0.3], clicks=1) == 0.0


class ClickingRuntime(BrightRuntime):
    """BrightRuntime whose clicks act exactly: a positive click adds a disk of radius 20 (256 frame) around itself, a
    negative one removes it; the previous logits are ignored. Counts decodes."""

    takes_clicks = True
    clicks_trained = True  # its clicks act as a trained decoder's should

    def __init__(self):
        super().__init__()
        self.decodes = 0

    def decode(self, embedding, boxes, modality=None, points=None, point_labels=None, mask_input=None):
        self.decodes += 1
        logits = super().decode(embedding, boxes, modality)
        if points is None:
            return logits
        ys, xs = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
        for i in range(len(boxes)):
            for (x, y), label in zip(points[i].tolist(), point_labels[i].tolist()):
                disk = (xs - x) ** 2 + (ys - y) ** 2 <= 400
                if label == 1:
                    logits[i, 0][disk] = 10.0
                elif label == 0:
                    logits[i, 0][disk] = -10.0
        return logits


def _image_2d():
    image = np.zeros((64, 64), np.uint8)
    image[10:40, 10:40] = 200  # object 1, bright but for a dark hole
    image[20:26, 20:26] = 60
    image[45:60, 45:60] = 200  # object 2, found whole by its box
    gts = np.zeros((64, 64), np.uint8)
    gts[10:40, 10:40] = 1
    gts[45:60, 45:60] = 2
    return Case(path=None, image=np.stack([image] * 3, -1), boxes=np.array([[9, 9, 40, 40], [44, 44, 60, 60]]),
                gts=gts, spacing=np.ones(2), modality=None)


def test_2d_refinement_starts_from_the_box_only_result_and_a_click_fixes_the_hole():
    model, case = ClickingRuntime(), _image_2d()
    refinement = Refinement(model, case)
    assert np.array_equal(refinement.segs, segment_case(model, case, ModalityChoice(model)).segs)
    assert not refinement.segs[22, 22]
    model.decodes = 0
    clicks = refinement.simulate(case.gts)
    assert clicks[1] is None and clicks[0].positive and clicks[0].position in {(22, 22), (22, 23), (23, 22), (23, 23)}
    assert model.decodes == 1  # only the clicked object, and the decoder alone (no encoder run)
    assert refinement.segs[20:26, 20:26].all() and (refinement.segs == case.gts).all()
    assert refinement.objects[0].slices[None].clicks == [(pytest.approx(clicks[0].position[1] * 4.0),
                                                          pytest.approx(clicks[0].position[0] * 4.0), 1)]
    refinement.click(1, (50, 50), positive=False)  # a user's click: object 2 loses a disk
    assert not refinement.segs[50, 50] and refinement.segs[58, 58] == 2
    with pytest.raises(ValueError, match="outside the image"):
        refinement.click(0, (64, 3), True)
    with pytest.raises(ValueError, match="takes no clicks"):
        Refinement(BrightRuntime(), case)


def _volume():
    volume = np.zeros((12, 64, 64), np.uint8)
    volume[2:11, 20:40, 20:40] = 200  # the object, on slices 2..10, beyond its box's slices 2..9
    volume[7, 20:40, 20:40] = 60  # slice 7: dark, propagation loses it there
    volume[7, 0, 0] = 255  # (slices are min-max normalized one by one: this keeps slice 7's object dark)
    gts = np.zeros(volume.shape, np.uint8)
    gts[2:11, 20:40, 20:40] = 1
    return Case(path=None, image=volume, boxes=np.array([[19, 19, 2, 40, 40, 9]]), gts=gts, spacing=np.ones(3), modality=None)


def _decoded_slices(refinement, carried: dict | None = None):
    """The slices `refinement` decodes from now on, in order; `carried` gets each one's carried mask prompt."""
    seen = []
    decode = refinement._decode

    def recording(z, objects, prompts, mask_prompts=None):
        seen.append(z)
        if carried is not None:
            carried[z] = None if mask_prompts is None else mask_prompts[0].clone()
        return decode(z, objects, prompts, mask_prompts)

    refinement._decode = recording
    return seen


def test_3d_a_click_decodes_its_slice_reruns_propagation_outward_and_carries_a_few_slices_inward():
    model, case = ClickingRuntime(), _volume()
    refinement = Refinement(model, case, zoom=False)  # the whole slice's frame: propagation is what is tested
    assert np.array_equal(refinement.segs, segment_case(model, case, ModalityChoice(model)).segs)
    assert refinement.objects[0].middle == 5 and not refinement.segs[7].any() and refinement.segs[8].any()
    carried, prompted = {}, []
    decode = model.decode
    model.decode = lambda *args, **kw: prompted.append(kw.get("mask_input")) or decode(*args, **kw)
    seen = _decoded_slices(refinement, carried)
    before = refinement.segs.copy()
    refinement.click(0, (7, 30, 30), positive=True)
    # slice 7 again with its click, then outward (up): 8 and 9 get the box of 7's new mask; then inward: 6 (up to
    # INWARD_CARRY slices, never the middle slice 5); 2..5 are untouched
    assert INWARD_CARRY == 2  # the slices below follow from it
    assert seen == [7, 8, 9, 6] and refinement.segs[7, 30, 30] == 1
    assert np.array_equal(refinement.segs[:6], before[:6])
    assert refinement.objects[0].slices[7].click_mask is not None
    # the click's correction travels: 8's mask prompt is 7's new logits, 9's is 8's, 6's is 7's; 7 has its own
    # clicks' prompt
    slices = refinement.objects[0].slices
    assert carried[7] is None
    assert torch.equal(carried[8], slices[7].logits) and torch.equal(carried[9], slices[8].logits)
    assert torch.equal(carried[6], slices[7].logits)
    assert len(prompted) == 4 and all(torch.equal(prompted[k][0], carried[z]) for k, z in ((1, 8), (2, 9), (3, 6)))
    seen.clear()
    # the middle slice, where nothing changes: both ways, stopping at an unchanged slice (6, last carried from 7,
    # changes; 7, decoded with its own click, does not)
    refinement.click(0, (5, 5, 5), positive=False)
    assert seen == [5, 6, 7, 4]
    seen.clear()
    refinement.click(0, (2, 30, 30), positive=True)  # below the middle: outward (none left), then inward 3, 4
    assert seen == [2, 3, 4]


def test_3d_a_click_beyond_the_box_extends_the_object_and_the_protocol_scores_steps():
    model, case = ClickingRuntime(), _volume()
    refinement = Refinement(model, case, zoom=False)
    assert not refinement.segs[10].any()
    seen = _decoded_slices(refinement)
    refinement.click(0, (10, 30, 30), positive=True)
    # propagated there, then the click, carried inward to 9 and 8
    assert seen == [10, 10, 9, 8] and refinement.segs[10].any()
    fresh = Refinement(model, case)
    first = fresh.simulate(case.gts)[0]  # the largest 3D error: the whole dark slice 7 or slice 10
    assert first.positive and first.position[0] in (7, 10)


@pytest.mark.parametrize("size", [20, 8])  # an object too large for a zoom, and one small enough
def test_a_real_model_refines_and_its_box_step_is_the_box_only_result(size):
    model = tiny_model()
    rng = np.random.default_rng(0)
    gts = np.zeros((40, 50), np.uint8)
    gts[5 : 5 + size, 10 : 10 + size] = 1
    case = Case(path=None, image=rng.integers(0, 255, (40, 50, 3), dtype=np.uint8),
                boxes=np.array([[10, 5, 9 + size, 4 + size]]), gts=gts, spacing=np.ones(2), modality="US")
    with torch.inference_mode():
        refinement = Refinement(model, case)
        assert np.array_equal(refinement.segs, segment_case(model, case, ModalityChoice(model)).segs)
        for _ in range(6):  # more clicks than MAX_POINTS: the latest five are given, earlier ones via the mask
            refinement.simulate(case.gts)
    state = refinement.objects[0].slices[None]
    assert refinement.decode_seconds > 0 and refinement.segs.shape == gts.shape
    assert state.click_mask is not None and refinement.objects[0].clicks == len(state.clicks)
    assert (state.frame is not None) == (size == 8)  # the small object was decoded on a zoom crop, the large one not


def test_a_zoom_crop_is_a_square_twice_the_object_and_its_clicks_inside_the_image():
    shape, k = (1000, 800), 256 / 1000  # k: original pixels -> the whole image's 256 frame
    box = np.array([400, 500, 410, 520]) * k  # a 10 x 20 px object
    # twice 20 px is under a quarter of the long side: the crop is 250 px, centred on the object
    assert zoom_window(box, np.zeros((0, 2)), shape) == (280, 385, 530, 635)
    # a click 190 px to the right widens it to twice the span of box and click
    assert zoom_window(box, np.array([[600, 510]]) * k, shape) == (300, 310, 700, 710)
    assert zoom_window(np.array([0, 0, 700, 700]) * k, np.zeros((0, 2)), shape) is None  # under 1.5x: no zoom
    assert zoom_window(np.array([760, 960, 790, 990]) * k, np.zeros((0, 2)), shape) == (550, 750, 800, 1000)  # in


def test_logits_resampled_into_a_crop_frame_show_the_same_picture():
    whole, crop = Frame(0.0, 0.0, 4.0), Frame(512.0, 256.0, 1.0)  # a 1024 px image; a 256 px crop at (512, 256)
    assert np.allclose(whole.to_frame(np.array([128.0, 64.0]), crop), [0.0, 0.0])
    x_of_pixel = (torch.arange(256, dtype=torch.float32) + 0.5) * 4.0  # each pixel's original x: a linear picture
    logits = x_of_pixel.expand(256, 256)[None]
    moved = resample_logits(logits, whole, crop)
    assert moved.shape == (1, 256, 256)
    assert torch.allclose(moved[0, 100], 512 + torch.arange(256) + 0.5, atol=1e-3)  # bilinear is exact on a ramp
    back = resample_logits(moved, crop, whole)
    assert torch.allclose(back[0, 80, 130:190], logits[0, 80, 130:190], atol=1e-3)  # inside the crop: unchanged


def _small_object():
    image = np.zeros((512, 512), np.uint8)
    image[200:224, 300:324] = 200  # a 24 px object with a dark 8 px hole: 12 px and 4 px at the whole 256 frame
    image[208:216, 308:316] = 60
    gts = np.zeros((512, 512), np.uint8)
    gts[200:224, 300:324] = 1
    return Case(path=None, image=np.stack([image] * 3, -1), boxes=np.array([[300, 200, 323, 223]]), gts=gts,
                spacing=np.ones(2), modality=None)


def test_a_small_object_is_refined_on_a_zoom_crop_embedded_once():
    model, case = ClickingRuntime(), _small_object()
    refinement = Refinement(model, case)
    assert model.embed_calls == 1 and not refinement.segs[211, 311]
    refinement.simulate(case.gts)  # a positive click in the hole
    # the crop: 128 px (a quarter of 512) around the object, 4x; its embedding is one more encoder run. The stand-in's
    # disk (radius 20 at its frame) is 10 px there: it fills the hole and stays inside the object
    assert refinement.crop_embeddings == 1 and model.embed_calls == 2
    assert refinement.objects[0].slices[None].frame == Frame(247.0, 147.0, 0.5)  # the box at 256 spans 300..322
    assert refinement.segs[208:216, 308:316].all() and not refinement.segs[case.gts == 0].any()  # (its rim blurs)
    refinement.click(0, (204, 304), positive=False)  # a second click inside the crop: the decoder alone
    assert model.embed_calls == 2 and not refinement.segs[204, 304] and refinement.segs[220, 320] == 1
    plain = Refinement(ClickingRuntime(), case, zoom=False)
    plain.simulate(case.gts)  # the same click on the whole frame: its disk is 40 px, spilling out of the object
    assert plain.segs[211, 311] and plain.segs.sum() > case.gts.sum() + 1000


def test_a_click_far_from_the_object_leaves_the_zoom_and_carries_the_mask_prompt_back():
    model, case = ClickingRuntime(), _small_object()
    refinement = Refinement(model, case)
    refinement.simulate(case.gts)
    prompts = []
    decode = model.decode
    model.decode = lambda *a, **k: prompts.append(k.get("mask_input")) or decode(*a, **k)
    refinement.click(0, (480, 20), positive=True)  # the crop would span most of the image: the whole frame
    state = refinement.objects[0].slices[None]
    assert state.frame is None and prompts[0].shape == (1, 1, 256, 256)
    # the crop's answer, carried back: the object's pixels are object in the whole frame's prompt too
    assert prompts[0][0, 0, 106, 156] > 0 and prompts[0][0, 0, 20, 20] < 0
    assert refinement.segs[480, 20] == 1


def test_a_focus_crop_is_a_quarter_of_the_image_centred_on_the_click_inside_the_image():
    shape, k = (1000, 800), 256 / 1000
    assert focus_window(np.array([400, 500]) * k, shape) == (275, 375, 525, 625)
    assert focus_window(np.array([790, 10]) * k, shape) == (550, 0, 800, 250)  # moved inside the image


def test_a_sparse_object_is_one_covering_under_half_of_its_box():
    shape, k = (1000, 800), 256 / 1000
    box, mask = np.array([50, 100, 750, 800]) * k, np.zeros(shape, bool)  # too large for a zoom
    mask[100:800, 50:399] = True  # 349 of 700 columns
    assert box_fill(mask, box, shape) == pytest.approx(349 / 700) and box_fill(None, box, shape) == 0.0
    assert click_crop(box, np.zeros((0, 2)), mask, shape) == ("focus", None)
    mask[100:800, 50:750] = True
    assert click_crop(box, np.zeros((0, 2)), mask, shape) == ("whole", None)  # compact: the whole frame
    small = np.array([400, 500, 410, 520]) * k
    assert click_crop(small, np.zeros((0, 2)), None, shape) == ("zoom", (280, 385, 530, 635))  # small: a zoom crop


def _sparse_object(compact: bool = False):
    image = np.zeros((512, 512), np.uint8)
    image[60:460, 100:104] = 200  # a thin 'vessel' tree: a trunk and a branch with a faint gap the box step misses
    image[250:254, 100:460] = 200
    image[250:254, 200:300] = 60
    if compact:
        image[60:460, 100:460] = 200
    gts = (image > 0).astype(np.uint8)
    return Case(path=None, image=np.stack([image] * 3, -1), boxes=np.array([[100, 60, 459, 459]]), gts=gts,
                spacing=np.ones(2), modality=None)


def test_a_sparse_object_is_refined_on_a_focus_crop_around_the_click():
    model, case = ClickingRuntime(), _sparse_object()
    refinement = Refinement(model, case)
    refinement.simulate(case.gts)  # a positive click in the gap
    state = refinement.objects[0].slices[None]
    x0, y0, x1, y1 = focus_window(state.clicks[-1][:2], (512, 512))
    assert (x1 - x0, y1 - y0) == (128, 128) and refinement.crop_embeddings == 1 and model.embed_calls == 2
    assert state.frame is None and state.logits.shape == (1, 256, 256)  # the answer is the whole frame's
    plain = Refinement(ClickingRuntime(), case, zoom=False)
    plain.simulate(case.gts)  # the same click on the whole frame alone: its disk is 40 px, on the crop's 10 px
    outside = np.ones((512, 512), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(refinement.segs[outside], plain.segs[outside])  # the crop's answer replaces it inside only
    bright = (case.image[..., 0] > 100).sum()
    added, spilled = refinement.segs.sum() - bright, plain.segs.sum() - bright
    assert 200 < added < 400 < 4000 < spilled  # a disk of radius 10 px around the click, not one of 40
    x, y = (int(v) for v in state.clicks[-1][:2])
    assert state.logits[0, y, x] > 0 and plain.objects[0].slices[None].logits[0, y + 10, x + 10] > 0
    assert state.logits[0, y + 10, x + 10] < 0  # 20 px from the click: inside the crop, the crop's answer


def test_a_compact_large_object_takes_no_crop():
    model, case = ClickingRuntime(), _sparse_object(compact=True)
    case.gts[300:310, 300:310] = 0  # a false-object error for a negative click
    refinement = Refinement(model, case)
    refinement.simulate(case.gts)
    assert refinement.crop_embeddings == 0 and model.embed_calls == 1
