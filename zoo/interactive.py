"""Refine a segmentation with clicks (issue #31): the one click simulation, and a case refined click by click.

The simulated click is the CVPR 2025 interactive challenge's ("Foundation Models for Interactive 3D Biomedical Image
Segmentation", CVPR25_iter_eval.py): for one object, the error is where its mask and its ground truth differ; of
the error's connected components (full connectivity: 8 in 2D, 26 in 3D) the largest is taken; its Euclidean
distance transform is computed in its bounding box padded by a quarter of its size (at least 1 voxel, so that the
image border counts as the component's boundary); the click lands on a maximum of that distance, the centre of the
component, chosen among equal maxima by numpy's RandomState(42), as the script seeds it. It is positive (object)
where the ground truth is object there (missed object), negative where it is not (false object). `next_click` is it;
distill.finetune trains with it at the 256 frame, benchmarks.clicks scores with it at the original resolution,
and the tests check it.

`Refinement` is a case segmented from its boxes through zoo.predict (the box-only result is zoo.predict's, bit for
bit) and then refined click by click, as a user refines it or as the protocol does:
- 2D: the object is decoded again with its box, all its clicks so far (the latest zoo.models.clicks.MAX_POINTS)
  and the previous step's logits as the mask prompt. A click costs the decoder alone: the embedding is kept.
- 3D: the click's slice is decoded again the same way (its box is the one propagation gave it), then propagation
  is rerun from that slice outward (away from the box's middle slice; both ways from the middle slice), each slice
  prompted by the box of its neighbour's new mask as zoo.predict propagates and by that neighbour's new logits as
  its mask prompt, so that the click's correction travels on with the object instead of stopping at its slice. A
  slice with clicks of its own keeps them (and the mask prompt it had when last clicked). Propagation stops where a
  slice's mask comes out unchanged. The box-only propagation is zoo.predict's, unchanged (no mask prompt). A click
  beyond the slices the box spans extends the object's range to it (the slices between are propagated first, then
  the click applies).
- Clicks are given at original pixel indices: (y, x), or (z, y, x) for a volume; they reach the decoder at the 256
  frame as boxes do (zoo.data.preprocess.scale_points).
- Zoom (on unless zoom=False): a clicked object much smaller than its image is decoded on a crop around it, embedded
  anew at 256, as FocalClick's target crop (Chen et al., CVPR 2022) refines: a caries 20 px wide in a 1024 px
  panoramic X-ray is 5 px at the whole image's 256 frame, where the decoder's tokens and its 4x-downscaled mask
  prompt cannot hold it, and a negative click beside it erases it. The crop is a square twice the larger side of the
  object's box and clicks, at least a quarter of the image's long side (at most 4x); where it would exceed two
  thirds of it (under 1.5x) the whole frame is kept. A crop's embedding is computed once and kept while the crop
  stays, so an object's first click costs one encoder run on the crop, the next ones the decoder alone. The mask
  prompt is carried between frames by resampling (resample_logits); the mask outside the crop is empty.
- Focus (on with zoom): a clicked object too large for a zoom but sparse, its mask covering under half of its box (a
  vessel tree, a retinal layer across a B-scan, lesions scattered over both lungs), is decoded on the whole frame with
  the click and then again on a focus crop around the click, a quarter of the image's long side (4x), with the whole
  frame's answer as its mask prompt; the crop's mask replaces the whole frame's inside the crop (FocalClick's focus
  crop, Chen et al., CVPR 2022). Such an object's box says little about it, and its detail is a pixel or two wide at
  the whole image's 256 frame. A compact object is left to the whole frame: there a crop cutting through it did worse.
  Each focus click costs one more encoder run, on its crop (focus_window, refine_on_focus).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import integrate, ndimage

from zoo.data.io import Case, label_dtype
from zoo.data.preprocess import IMAGE_SIZE, box_from_mask, postprocess_logits, preprocess_image, scale_points
from zoo.modalities import modality_id
from zoo.models.clicks import MAX_POINTS, NEGATIVE, PAD_LABEL, POSITIVE
from zoo.predict import DECODE_CHUNK, ModalityChoice, SliceEmbeddings, Trace, segment_2d, segment_3d

CLICK_SEED = 42  # the CVPR 2025 script's np.random.seed(42) before each draw among equal maxima
PROTOCOL_CLICKS = 5  # clicks after the box in the CVPR 2025 protocol
CLICK_MODEL = "cp_tinyvit_fast_clicks_openvino"  # the zoo's click-trained model, named where another is refused
UNTRAINED_CLICKS = ("its decoder was trained on boxes alone (no click stage, distill.finetune --clicks): clicks reach "
                    f"it untrained and may make a mask worse; --model {CLICK_MODEL} is trained for them "
                    "(docs/interactive.md)")


ZOOM_CONTEXT = 2.0  # the crop's side: twice the larger side of the object's box and clicks
ZOOM_MAX = 4.0  # the crop is at least 1/4 of the image's long side: beyond 4x the crop is mostly interpolation
ZOOM_MIN = 1.5  # under 1.5x the whole frame is kept: too little gained for an encoder run
FOCUS_ZOOM = 4.0  # a focus crop's side is the image's long side / 4, as the most a zoom crop enlarges (ZOOM_MAX)
SPARSE_FILL = 0.5  # a mask covering under half of its box is sparse: a vessel tree, a layer, scattered lesions
# A 3D click's correction is carried outward to the end of the object and this many slices inward (towards the middle
# slice, which keeps the user's box). Chosen on 12 train volumes, DSC after 5 clicks: none 0.826, 1: 0.833, 2: 0.836,
# 3: 0.833, 5: 0.812, all the way to the middle: worse than none (runs/inward, docs/interactive.md).
INWARD_CARRY = 2


def untrained_clicks(model) -> bool:
    """Whether `model` takes clicks that no click stage trained it for (zoo.runtime.interface.clicks_trained)."""
    return bool(getattr(model, "takes_clicks", False)) and not getattr(model, "clicks_trained", False)


@dataclass(frozen=True)
class Click:
    position: tuple[int, ...]  # array index: (y, x) in 2D, (z, y, x) in 3D
    positive: bool  # True: missed object (a foreground click); False: false object (a background click)


def component_distance(component: np.ndarray) -> np.ndarray:
    """Euclidean distance transform of one connected component (bool, any dimension), computed in its bounding box
    padded by max(1, 25% of its size) on every side, so that the array's border is a boundary too; zero outside."""
    coords = np.argwhere(component)
    low, high = coords.min(axis=0), coords.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(low, high))
    crop = component[box]
    pad = np.maximum((np.array(crop.shape) * 0.25).astype(int), 1)
    distance = ndimage.distance_transform_edt(np.pad(crop, [(p, p) for p in pad]))
    full = np.zeros(component.shape, dtype=distance.dtype)
    full[box] = distance[tuple(slice(p, p + s) for p, s in zip(pad, crop.shape))]
    return full


def next_click(prediction: np.ndarray, truth: np.ndarray, seed: int = CLICK_SEED) -> Click | None:
    """The click at the centre of the largest connected error component of one object's `prediction` against its
    `truth` (bool arrays of one shape, 2D or 3D); None where they agree everywhere (no click is needed)."""
    prediction, truth = np.asarray(prediction, dtype=bool), np.asarray(truth, dtype=bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    error = prediction != truth
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=ndimage.generate_binary_structure(error.ndim, error.ndim))
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    distance = component_distance(components == sizes.argmax())  # the first of equal sizes, as np.argmax
    maxima = np.argwhere(distance == distance.max())
    center = tuple(int(v) for v in maxima[np.random.RandomState(seed).choice(len(maxima))])
    return Click(center, bool(truth[center]))


@dataclass(frozen=True)
class Frame:
    """Where a 256 frame lies in the original image: the frame's coordinate u is the original x0 + u * scale (y
    likewise). The whole image's frame is full_frame(shape); a zoom crop's starts at its corner."""

    x0: float
    y0: float
    scale: float

    def to_frame(self, xy: np.ndarray, other: "Frame") -> np.ndarray:
        """(..., 2) coordinates (x, y) in this frame -> the same points in `other`'s frame."""
        offset = np.array([self.x0 - other.x0, self.y0 - other.y0])
        return (np.asarray(xy, dtype=np.float64) * self.scale + offset) / other.scale


def full_frame(shape: tuple[int, ...]) -> Frame:
    """The 256 frame of a whole (H, W) image, as zoo.data.preprocess scales it."""
    return Frame(0.0, 0.0, max(shape[-2:]) / IMAGE_SIZE)


def zoom_window(box256: np.ndarray, clicks256: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The crop (x0, y0, x1, y1), original pixels, end exclusive, that zooms on an object: box [x0, y0, x1, y1] and
    clicks (P, 2) (x, y) in the whole image's 256 frame; None where the zoom would be under ZOOM_MIN."""
    height, width = shape
    long_side = max(height, width)
    points = np.vstack([np.reshape(box256, (2, 2)), np.reshape(clicks256, (-1, 2))]) * (long_side / IMAGE_SIZE)
    low, high = points.min(axis=0), points.max(axis=0)
    side = max(ZOOM_CONTEXT * float((high - low).max()), long_side / ZOOM_MAX)
    if side * ZOOM_MIN > long_side:
        return None
    side = int(np.ceil(side))
    centre = (low + high) / 2
    x0 = int(np.clip(round(centre[0] - side / 2), 0, max(0, width - side)))
    y0 = int(np.clip(round(centre[1] - side / 2), 0, max(0, height - side)))
    return x0, y0, min(width, x0 + side), min(height, y0 + side)


def window_frame(window: tuple[int, int, int, int]) -> Frame:
    """The 256 frame of a crop (x0, y0, x1, y1): preprocess_image resizes its long side to 256."""
    x0, y0, x1, y1 = window
    return Frame(float(x0), float(y0), max(x1 - x0, y1 - y0) / IMAGE_SIZE)


def resample_logits(logits: torch.Tensor, source: Frame, target: Frame) -> torch.Tensor:
    """Low-resolution logits (C, 256, 256) in `source`'s frame -> the same picture in `target`'s frame (bilinear;
    where target reaches beyond source, source's edge value): a mask prompt carried into or out of a zoom crop."""
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float64) + 0.5  # pixel centres, as grid_sample's align_corners=False
    xs = ((target.x0 + centres * target.scale) - source.x0) / source.scale / IMAGE_SIZE * 2 - 1
    ys = ((target.y0 + centres * target.scale) - source.y0) / source.scale / IMAGE_SIZE * 2 - 1
    grid = torch.stack([xs[None, :].expand(IMAGE_SIZE, -1), ys[:, None].expand(-1, IMAGE_SIZE)], dim=-1)
    return F.grid_sample(logits[None].float(), grid[None].float(), mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def whole_frame_logits(logits: torch.Tensor, frame: Frame | None, shape: tuple[int, ...]) -> torch.Tensor:
    """A mask prompt (C, 256, 256) in the whole image's frame: as it is where `frame` is None (it is that frame's
    already), else resampled out of the zoom crop whose frame it is."""
    return logits if frame is None else resample_logits(logits, frame, full_frame(shape))


def box_fill(mask: np.ndarray, box256: np.ndarray, shape: tuple[int, int]) -> float:
    """The share of a box [x0, y0, x1, y1] (the whole image's 256 frame) that `mask` (H, W; None: none yet) covers."""
    if mask is None:
        return 0.0
    x0, y0, x1, y1 = np.asarray(box256, dtype=np.float64) * (max(shape) / IMAGE_SIZE)
    return float(np.count_nonzero(mask)) / max(1.0, (x1 - x0) * (y1 - y0))


def click_crop(box256: np.ndarray, clicks256: np.ndarray, mask: np.ndarray | None,
               shape: tuple[int, int]) -> tuple[str, tuple[int, int, int, int] | None]:
    """How a clicked object is decoded, from its box (4,) and clicks (P, 2) (x, y) in the whole image's 256 frame and
    its mask (H, W) before the click: ('zoom', window) on a zoom crop where it is small (zoom_window); else
    ('focus', None) where it is sparse (box_fill < SPARSE_FILL): the whole frame, then a focus crop around its latest
    click (refine_on_focus); else ('whole', None)."""
    window = zoom_window(box256, clicks256, shape)
    if window is not None:
        return "zoom", window
    return ("focus" if box_fill(mask, box256, shape) < SPARSE_FILL else "whole"), None


def focus_window(click256, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The focus crop (x0, y0, x1, y1), original pixels, end exclusive: a square of a quarter of the image's long
    side (FOCUS_ZOOM) centred on a click (x, y) in the whole image's 256 frame, moved inside the image."""
    height, width = shape
    long_side = max(height, width)
    side = int(np.ceil(long_side / FOCUS_ZOOM))
    x, y = np.asarray(click256, dtype=np.float64)[:2] * (long_side / IMAGE_SIZE)
    x0 = int(np.clip(round(x - side / 2), 0, max(0, width - side)))
    y0 = int(np.clip(round(y - side / 2), 0, max(0, height - side)))
    return x0, y0, min(width, x0 + side), min(height, y0 + side)


def decode_on_crop(model, image: np.ndarray, window: tuple[int, int, int, int], kept: tuple | None,
                   box256: np.ndarray, clicks: list[tuple[float, float, int]], mask_prompt: torch.Tensor | None,
                   mask_frame: Frame | None, modality) -> tuple[torch.Tensor, Frame, np.ndarray, tuple]:
    """One object's click decode on a crop (zoom or focus) of `image` (H, W[, 3]): its box (4,) and clicks [(x, y,
    label)] in the whole image's 256 frame, and its mask prompt (1, 256, 256) in `mask_frame`'s (None: the whole
    image's), are carried into the crop's frame. `kept`: (window, embedding, resized) of the crop embedded before,
    reused while the window is the same; else the crop is embedded. The box is clipped to the crop and clicks outside
    it are left out (a focus crop cuts through its object; a zoom crop holds box and clicks whole). -> (logits (1, 1,
    256, 256) in the crop's frame, that frame, the mask (H, W) at the original size, empty outside the crop, and the
    (window, embedding, resized) used). zoo.interactive.Refinement and the browser app (zoo.app) crop through it."""
    x0, y0, x1, y1 = window
    if kept is None or kept[0] != window:
        tensor, resized = preprocess_image(image[y0:y1, x0:x1])
        kept = (window, model.embed(tensor), resized)
    _, embedding, resized = kept
    whole, crop = full_frame(image.shape[:2]), window_frame(window)
    box, inside = prompts_in_crop(box256, clicks, whole, window)
    points, labels = padded_clicks([inside])
    mask_input = None if mask_prompt is None else resample_logits(mask_prompt.reshape(1, IMAGE_SIZE, IMAGE_SIZE),
                                                                  mask_frame or whole, crop)[None]
    logits = model.decode(embedding, torch.as_tensor(box, dtype=torch.float32), modality, points=points,
                          point_labels=labels, mask_input=mask_input)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = postprocess_logits(logits, resized, (y1 - y0, x1 - x0))[0]
    return logits, crop, mask, kept


def refine_on_focus(model, image: np.ndarray, kept: tuple | None, box256: np.ndarray,
                    clicks: list[tuple[float, float, int]], logits: torch.Tensor, mask: np.ndarray,
                    modality) -> tuple[torch.Tensor, np.ndarray, tuple]:
    """A sparse object's whole-frame click decode, its `logits` (1, 256, 256) and `mask` (H, W), refined on the
    focus crop around its latest click: decoded there (decode_on_crop) with its box, its clicks inside the crop and
    the whole frame's answer as the mask prompt. -> (logits (1, 256, 256) and mask (H, W) in the whole image's
    frame, the crop's inside the crop, the whole frame's elsewhere; the (window, embedding, resized) used)."""
    shape = image.shape[:2]
    window = focus_window(clicks[-1][:2], shape)
    crop_logits, _, crop_mask, kept = decode_on_crop(model, image, window, kept, box256, clicks, logits, None,
                                                     modality)
    x0, y0, x1, y1 = window
    refined = mask.copy()
    refined[y0:y1, x0:x1] = crop_mask[y0:y1, x0:x1]
    return paste_focus(logits, crop_logits[0], window, shape), refined, kept


def prompts_in_crop(box256: np.ndarray, clicks: list[tuple[float, float, int]], whole: Frame,
                    window: tuple[int, int, int, int]) -> tuple[np.ndarray, list[tuple[float, float, int]]]:
    """A box (4,) and clicks [(x, y, label)] in the `whole` image's 256 frame -> the box (1, 4) clipped to the crop
    `window` (x0, y0, x1, y1) and the clicks inside it, in the crop's 256 frame (a focus crop cuts through its
    object; a zoom crop holds box and clicks whole)."""
    crop = window_frame(window)
    extent = np.array([window[2] - window[0], window[3] - window[1]]) / crop.scale  # its (width, height) there
    box = np.clip(whole.to_frame(np.reshape(box256, (2, 2)), crop), 0, extent).reshape(1, 4)
    inside = [(*xy, c[2]) for c in clicks for xy in [whole.to_frame(np.array(c[:2]), crop)]
              if 0 <= xy[0] < extent[0] and 0 <= xy[1] < extent[1]]
    return box, inside


def paste_focus(logits: torch.Tensor, crop_logits: torch.Tensor, window: tuple[int, int, int, int],
                shape: tuple[int, int]) -> torch.Tensor:
    """Whole-frame logits (1, 256, 256) of an (H, W) image with a focus crop's (1, 256, 256, its own frame) put in
    place inside the crop `window` (x0, y0, x1, y1): what a focus click keeps for the next step (float32)."""
    x0, y0, x1, y1 = window
    whole = full_frame(shape)
    centres = (torch.arange(IMAGE_SIZE, dtype=torch.float64) + 0.5) * whole.scale  # each 256 pixel's original place
    inside = ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None, :]
    base = logits.reshape(1, IMAGE_SIZE, IMAGE_SIZE).float()
    return torch.where(inside[None], resample_logits(crop_logits.float(), window_frame(window), whole), base)


def interaction_auc(scores, clicks: int = PROTOCOL_CLICKS) -> float:
    """DSC_AUC / NSD_AUC of one case as CVPR25_iter_eval.py computes it: the trapezoid (unit steps) under the scores
    of the last `clicks` steps, i.e. of the click steps (the box step is left out there, as a box is optional in
    that challenge; with 5 clicks the AUC lies in 0..4). `scores`: one per step, the box step first."""
    values = np.asarray(scores, dtype=float)[-clicks:]
    if len(values) < 2:
        return 0.0
    return float(integrate.cumulative_trapezoid(values, np.arange(len(values)))[-1])


@dataclass
class SliceState:
    prompt: np.ndarray  # the 256-scale box it was last decoded with
    logits: torch.Tensor  # (1, 256, 256): its latest low-resolution logits
    mask: np.ndarray  # (H, W) bool at the original size
    clicks: list[tuple[float, float, int]] = field(default_factory=list)  # (x, y) at 256 scale, label 1 / 0
    click_mask: torch.Tensor | None = None  # the logits it had when it was last clicked: its mask prompt
    frame: Frame | None = None  # the frame of `logits`: None the whole image's, else a zoom crop's
    click_frame: Frame | None = None  # the frame of `click_mask`


@dataclass
class ObjectState:
    label: int
    start_box: np.ndarray  # 256-scale box of its prompt (a volume: on the middle slice)
    middle: int | None  # a volume's middle slice (where propagation starts); None in 2D
    slices: dict = field(default_factory=dict)  # z (None in 2D) -> SliceState
    clicks: int = 0  # clicks given to this object


class Refinement:
    """A case segmented from its boxes (zoo.predict, unchanged), then refined click by click.

        refinement = Refinement(model, case)          # the box-only segmentation: refinement.segs
        refinement.click(0, (120, 85), positive=True)  # object 0 (the first box), pixel row 120, column 85
        refinement.segs                                # labels 1..N, as zoo.predict writes them

    `model` answers zoo.runtime.interface and takes clicks (model.takes_clicks); `decode_seconds` adds up the time
    spent decoding clicks (the cost of refinement: the whole image's embeddings computed once, a zoom crop's once
    while it stays, a focus crop's at each click); zoom=False decodes every click on the whole image's embedding
    alone (no zoom or focus crop: the decoder alone)."""

    def __init__(self, model, case: Case, modalities: ModalityChoice | None = None, zoom: bool = True):
        if not getattr(model, "takes_clicks", False):
            raise ValueError(f"{getattr(model, 'folder', type(model).__name__)}: this model takes no clicks")
        self.model, self.case = model, case
        modalities = modalities or ModalityChoice(model)
        trace = Trace()
        self.is_3d = case.is_3d
        self.embeddings = SliceEmbeddings(model, case.image) if self.is_3d else None
        start = time.perf_counter()
        if self.is_3d:
            result = segment_3d(model, case, modalities, self.embeddings, trace)
            self.shape = case.image.shape
        else:
            result = segment_2d(model, case, modalities, trace)
            self.shape = case.image.shape[:2]
        self.box_seconds = time.perf_counter() - start  # the box-only segmentation, encoder runs included
        self._embedding_2d, self._resized = trace.embedding, trace.resized
        self.result = result
        self.modality = None if result.modality is None else modality_id(result.modality)
        self.segs = result.segs
        self.dtype = result.segs.dtype
        self.objects = []
        for b in range(len(case.boxes)):
            slices = {z: SliceState(prompt, logits, mask) for (k, z), (prompt, logits, mask) in trace.decoded.items() if k == b}
            middle = None
            if self.is_3d:
                z0, z1 = int(case.boxes[b][2]), int(case.boxes[b][5])
                middle = int((z1 - z0) / 2 + z0)
            start = slices[middle].prompt if middle in slices else next(iter(slices.values())).prompt
            self.objects.append(ObjectState(b + 1, np.asarray(start), middle, slices))
        self.decode_seconds = 0.0  # time spent decoding clicks: the cost of refinement (zoom crops' encoder runs too)
        self.zoom = zoom
        self.crops: dict = {}  # (object label, z) -> (window, embedding, resized) of its zoom crop
        self.crop_embeddings = 0  # encoder runs on zoom crops

    # -- decoding ---------------------------------------------------------------------------------------------------
    def _embedding(self, z):
        return self._embedding_2d if z is None else self.embeddings[z]

    @property
    def resized(self) -> tuple[int, int]:
        return self.embeddings.resized if self.is_3d else self._resized

    def _decode(self, z, objects: list[ObjectState], prompts: list[np.ndarray],
                carried: list[torch.Tensor] | None = None) -> None:
        """Decode `objects` on slice z (None in 2D) with these box prompts and each one's clicks on that slice: a
        clicked object small enough for a zoom on its crop, the others together on the whole frame, a sparse one's
        then refined on its focus crop (click_crop). `carried`: for each object, the logits (1, 256, 256) of the
        slice propagation walked from, the mask prompt of a slice without clicks of its own (None: the box alone
        for all)."""
        whole, focus = [], []
        for i, (obj, prompt) in enumerate(zip(objects, prompts)):
            state = obj.slices.get(z)
            how, window = "whole", None
            if self.zoom and state is not None and state.clicks:
                how, window = click_crop(prompt, np.array([c[:2] for c in state.clicks]), state.mask, self.shape[-2:])
            if how == "zoom":
                self._decode_zoomed(z, obj, np.asarray(prompt), window)
            else:
                whole.append(i)
                if how == "focus":
                    focus.append(obj)
        if whole:
            self._decode_whole(z, [objects[i] for i in whole], [prompts[i] for i in whole],
                               None if carried is None else [carried[i] for i in whole])
        for obj in focus:
            self._refine_focus(z, obj)

    def _decode_whole(self, z, objects: list[ObjectState], prompts: list[np.ndarray],
                      carried: list[torch.Tensor] | None = None) -> None:
        embedding = self._embedding(z)
        start = time.perf_counter()
        for first in range(0, len(objects), DECODE_CHUNK):
            chunk, boxes = objects[first : first + DECODE_CHUNK], prompts[first : first + DECODE_CHUNK]
            states = [obj.slices.get(z) for obj in chunk]
            clicked = [s is not None and bool(s.clicks) for s in states]
            box_t = torch.as_tensor(np.stack(boxes), dtype=torch.float32)
            if any(clicked):
                if not all(clicked):
                    raise RuntimeError("objects with and without clicks are decoded apart")
                points, labels = padded_clicks([s.clicks for s in states])
                masks = [s.click_mask for s in states]
                mask_input = None if any(m is None for m in masks) else torch.stack(
                    [whole_frame_logits(s.click_mask, s.click_frame, self.shape) for s in states])
                logits = self.model.decode(embedding, box_t, self.modality, points=points, point_labels=labels,
                                           mask_input=mask_input)
            elif carried is not None:
                logits = self.model.decode(embedding, box_t, self.modality,
                                           mask_input=torch.stack(carried[first : first + DECODE_CHUNK]))
            else:
                logits = self.model.decode(embedding, box_t, self.modality)
            masks = postprocess_logits(logits, self.resized, self.shape[-2:])
            for obj, prompt, lowres, mask in zip(chunk, boxes, logits, masks):
                state = obj.slices.get(z)
                if state is None:
                    obj.slices[z] = SliceState(np.asarray(prompt), lowres, mask)
                else:
                    state.prompt, state.logits, state.mask, state.frame = np.asarray(prompt), lowres, mask, None
        self.decode_seconds += time.perf_counter() - start

    def _decode_zoomed(self, z, obj: ObjectState, prompt: np.ndarray, window: tuple[int, int, int, int]) -> None:
        """Decode one clicked object on slice z on its zoom crop (decode_on_crop), the crop's embedding kept."""
        start = time.perf_counter()
        state = obj.slices[z]
        image = self.case.image if z is None else self.case.image[z]
        kept = self.crops.get((obj.label, z))
        logits, state.frame, state.mask, crop = decode_on_crop(
            self.model, image, window, kept, prompt, state.clicks, state.click_mask, state.click_frame, self.modality)
        if crop is not kept:
            self.crops[(obj.label, z)] = crop
            self.crop_embeddings += 1
        state.prompt, state.logits = prompt, logits[0]
        self.decode_seconds += time.perf_counter() - start

    def _refine_focus(self, z, obj: ObjectState) -> None:
        """Refine a sparse object's whole-frame decode on slice z on the focus crop around its latest click."""
        start = time.perf_counter()
        state = obj.slices[z]
        image = self.case.image if z is None else self.case.image[z]
        kept = self.crops.get((obj.label, z))
        state.logits, state.mask, crop = refine_on_focus(self.model, image, kept, state.prompt, state.clicks,
                                                         state.logits, state.mask, self.modality)
        if crop is not kept:
            self.crops[(obj.label, z)] = crop
            self.crop_embeddings += 1
        self.decode_seconds += time.perf_counter() - start

    def _prompt(self, obj: ObjectState, z: int, direction: int) -> np.ndarray:
        """The box propagation gives slice z: the start box on the middle slice, else the box of the mask on the
        slice before it (in walking order) widened by 3 px, or the start box where that mask is empty."""
        if z == obj.middle or (z - direction) not in obj.slices:
            return obj.start_box
        carried = box_from_mask(obj.slices[z - direction].mask.astype(self.dtype) * obj.label)
        return obj.start_box if carried is None else carried

    def _propagate(self, obj: ObjectState, start: int, direction: int, end: int, stop_unchanged: bool = True,
                   carry: bool = False) -> None:
        """Decode slices start, start + direction, ... end of one object; stop at a slice decoded before whose mask
        comes out unchanged. carry: each slice's mask prompt is the new logits of the slice walked from."""
        for z in range(start, end + direction, direction):
            before = obj.slices[z].mask if z in obj.slices else None
            walked_from = obj.slices.get(z - direction)
            carried = None
            if carry and walked_from is not None:
                carried = [whole_frame_logits(walked_from.logits, walked_from.frame, self.shape)]
            self._decode(z, [obj], [self._prompt(obj, z, direction)], carried)
            if stop_unchanged and before is not None and np.array_equal(before, obj.slices[z].mask):
                return

    # -- clicks -------------------------------------------------------------------------------------------------------
    def click(self, index: int, position, positive: bool) -> None:
        """Refine object `index` (0-based, box order) with one click at `position` (original pixel indices: (y, x),
        a volume's (z, y, x)); segs is updated."""
        self.clicks({index: Click(tuple(int(v) for v in position), bool(positive))})

    def clicks(self, clicks: dict[int, Click | None]) -> None:
        """One click for each of several objects, applied together (one step of the protocol): in 2D the objects
        clicked are decoded in one batch."""
        clicks = {i: c for i, c in clicks.items() if c is not None}
        for index, click in clicks.items():
            if not 0 <= index < len(self.objects):
                raise ValueError(f"object {index} does not exist (the case has {len(self.objects)} boxes)")
            if len(click.position) != len(self.shape) or not all(0 <= p < s for p, s in zip(click.position, self.shape)):
                raise ValueError(f"click {click.position} lies outside the image {self.shape}")
        if self.is_3d:
            for index, click in clicks.items():
                self._click_3d(self.objects[index], click)
        elif clicks:
            objects = [self.objects[i] for i in clicks]
            for obj, click in zip(objects, clicks.values()):
                self._add_click(obj.slices[None], click.position, click.positive)
                obj.clicks += 1
            self._decode(None, objects, [obj.slices[None].prompt for obj in objects])
        self.segs = self.compose()

    def _add_click(self, state: SliceState, position, positive: bool) -> None:
        x, y = scale_points(np.array([[position[-1], position[-2]]], dtype=np.float64), self.shape[-2:])[0]
        state.click_mask, state.click_frame = state.logits, state.frame
        state.clicks.append((float(x), float(y), POSITIVE if positive else NEGATIVE))

    def _click_3d(self, obj: ObjectState, click: Click) -> None:
        z = click.position[0]
        decoded = sorted(obj.slices)
        low, high = decoded[0], decoded[-1]
        if z > high:  # beyond the slices the box spans: propagate there first
            self._propagate(obj, high + 1, 1, z, stop_unchanged=False)
        elif z < low:
            self._propagate(obj, low - 1, -1, z, stop_unchanged=False)
        self._add_click(obj.slices[z], click.position, click.positive)
        obj.clicks += 1
        direction = 1 if z >= obj.middle else -1
        self._decode(z, [obj], [self._prompt(obj, z, direction)])
        decoded = sorted(obj.slices)
        if z >= obj.middle and z + 1 <= decoded[-1]:
            self._propagate(obj, z + 1, 1, decoded[-1], carry=True)
        if z <= obj.middle and z - 1 >= decoded[0]:
            self._propagate(obj, z - 1, -1, decoded[0], carry=True)
        # inward too, a few slices: they were propagated towards the clicked slice and share its error
        if z > obj.middle + 1:
            self._propagate(obj, z - 1, -1, max(obj.middle + 1, z - INWARD_CARRY), stop_unchanged=False, carry=True)
        elif z < obj.middle - 1:
            self._propagate(obj, z + 1, 1, min(obj.middle - 1, z + INWARD_CARRY), stop_unchanged=False, carry=True)

    def compose(self) -> np.ndarray:
        """The label map of every object's masks; where masks overlap the later box wins, as in zoo.predict."""
        segs = np.zeros(self.shape, dtype=label_dtype(len(self.objects)))
        for obj in self.objects:
            for z, state in obj.slices.items():
                target = segs if z is None else segs[z]
                target[state.mask] = np.maximum(target[state.mask], obj.label)
        return segs

    def simulate(self, gts: np.ndarray, seed: int = CLICK_SEED) -> dict[int, Click | None]:
        """The protocol's next step: each object's click from the current label map against `gts` (labels 1..N as
        the boxes), applied together; returns them (None: that object has no error left)."""
        chosen = {obj.label - 1: next_click(self.segs == obj.label, gts == obj.label, seed) for obj in self.objects}
        self.clicks(chosen)
        return chosen


def padded_clicks(rows: list[list[tuple[float, float, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object click lists [(x, y, label), ...] -> points (N, P, 2), point_labels (N, P) padded with -1 to the
    longest (at most MAX_POINTS: each object's latest; zoo.models.clicks pads them to MAX_POINTS)."""
    rows = [row[-MAX_POINTS:] for row in rows]
    width = max(1, max(len(row) for row in rows))
    points = torch.zeros(len(rows), width, 2)
    labels = torch.full((len(rows), width), float(PAD_LABEL))
    for i, row in enumerate(rows):
        for j, (x, y, label) in enumerate(row):
            points[i, j] = torch.tensor([x, y])
            labels[i, j] = label
    return points, labels
