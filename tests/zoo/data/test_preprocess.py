import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zoo.data.preprocess import (
    IMAGE_SIZE,
    box_from_mask,
    pad_to_square,
    postprocess_logits,
    preprocess_image,
    resize_longest_side,
    resized_shape,
    scale_boxes,
)


def test_resize_longest_side_rounds_like_the_official_script():
    assert resized_shape(300, 1024) == (75, 256)
    assert resized_shape(565, 584) == (248, 256)
    assert resize_longest_side(np.zeros((499, 1024, 3), np.uint8)).shape == (125, 256, 3)


def test_preprocess_normalizes_pads_and_keeps_grey_equal_to_rgb():
    rng = np.random.default_rng(1)
    grey = rng.integers(10, 200, (100, 50), dtype=np.uint8)
    tensor, resized = preprocess_image(grey)
    assert tensor.shape == (1, 3, 256, 256) and tensor.dtype == torch.float32
    assert resized == (256, 128)
    valid = tensor[..., :256, :128]
    assert valid.min() == 0 and valid.max() == 1
    assert torch.all(tensor[..., 128:] == 0)
    rgb, _ = preprocess_image(np.repeat(grey[..., None], 3, axis=-1))
    assert torch.equal(tensor, rgb)


def _official_preprocess(image: np.ndarray) -> torch.Tensor:
    """The official CVPR24 LiteMedSAM script's lines: 3 channels, resize, float64 min-max, pad, float32."""
    image = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
    resized = resize_longest_side(image)
    normalized = (resized - resized.min()) / np.clip(resized.max() - resized.min(), a_min=1e-8, a_max=None)
    return torch.tensor(pad_to_square(normalized)).float().permute(2, 0, 1)[None]


@given(h=st.integers(1, 700), w=st.integers(1, 700), channels=st.sampled_from([None, 3]), seed=st.integers(0, 9))
@settings(max_examples=40, deadline=None)
@example(h=256, w=256, channels=3, seed=0)  # already 256 on the longest side: not resized
@example(h=256, w=200, channels=None, seed=1)
@example(h=1, w=256, channels=3, seed=2)
def test_preprocess_gives_the_official_scripts_tensor_exactly(h, w, channels, seed):
    image = np.random.default_rng(seed).integers(0, 256, (h, w) if channels is None else (h, w, channels), dtype=np.uint8)
    tensor, resized = preprocess_image(image)
    assert torch.equal(tensor, _official_preprocess(image)) and resized == resized_shape(h, w)


def test_postprocess_at_the_original_size_is_the_threshold_alone():
    logits = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    interpolated = torch.nn.functional.interpolate(logits[..., :256, :200], size=(256, 200), mode="bilinear", align_corners=False)
    assert np.array_equal(postprocess_logits(logits, (256, 200), (256, 200)), (interpolated[:, 0] > 0).numpy())
    assert torch.equal(interpolated, logits[..., :256, :200])  # bilinear at the same size is the identity


def test_constant_image_does_not_divide_by_zero():
    tensor, _ = preprocess_image(np.full((30, 30, 3), 7, np.uint8))
    assert torch.all(tensor == 0)


def test_scale_boxes_truncates_at_256_scale():
    assert scale_boxes(np.array([[10, 20, 511, 300]]), (512, 1024)).tolist() == [[2.0, 5.0, 127.0, 75.0]]


def test_box_from_mask_widens_by_three_and_clips():
    mask = np.zeros((512, 512), np.uint8)
    mask[100:200, 0:50] = 1
    assert box_from_mask(mask).tolist() == [0.0, 47.0, 27.0, 102.0]
    assert box_from_mask(np.zeros((20, 20), np.uint8)) is None


def test_postprocess_crops_padding_and_resizes():
    logits = torch.full((2, 1, 256, 256), -1.0)
    logits[0, :, :64, :128] = 1.0  # top-left quarter of the unpadded (128, 256) area
    masks = postprocess_logits(logits, (128, 256), (64, 128))
    assert masks.shape == (2, 64, 128) and masks.dtype == bool
    assert masks[0, :32, :64].all() and not masks[0, 32:].any() and not masks[1].any()


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 4096), w=st.integers(1, 4096), data=st.data())
def test_any_valid_box_maps_inside_256_and_back_within_one_pixel(h, w, data):
    x0 = data.draw(st.integers(0, w - 1))
    x1 = data.draw(st.integers(x0, w - 1))
    y0 = data.draw(st.integers(0, h - 1))
    y1 = data.draw(st.integers(y0, h - 1))
    box = np.array([[x0, y0, x1, y1]], dtype=np.float64)
    scaled = scale_boxes(box, (h, w))
    assert np.all(scaled >= 0) and np.all(scaled <= IMAGE_SIZE - 1)
    scale = IMAGE_SIZE / max(h, w)
    back = scaled / scale
    # truncation at 256 scale loses less than one 256-scale pixel: at most 1/scale original pixels
    assert np.all(box - back >= -1e-9) and np.all(box - back < 1 / scale + 1e-9)
    new_h, new_w = resized_shape(h, w)
    assert 1 <= new_h <= IMAGE_SIZE and 1 <= new_w <= IMAGE_SIZE and max(new_h, new_w) == IMAGE_SIZE
    assert scaled[0, 2] <= new_w and scaled[0, 3] <= new_h


def test_pad_to_square_shapes():
    assert pad_to_square(np.ones((10, 20))).shape == (256, 256)
    assert pad_to_square(np.ones((10, 20, 3))).shape == (256, 256, 3)
