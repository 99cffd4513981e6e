"""Segment in the browser: a local web app where a clinician opens an image, draws a box, corrects it with clicks
and saves the labels, on a laptop CPU.

    python -m zoo.app [--model cp_tinyvit_fast] [--host 127.0.0.1] [--port 8000] [--open] [--max-upload-mb 1024]
        [--max-sessions 4] [--threads N]

The page (zoo/app_static: plain HTML, JS and canvas; nothing is fetched from elsewhere) talks to the small JSON API
below. Every step is zoo's own: files are read by zoo.formats.read_image (a challenge npz by zoo.io.load_case, a
zipped DICOM series unpacked into a folder first), made 8-bit by zoo.formats.to_uint8; a 2D box is decoded as
zoo.predict.segment_2d decodes it and a volume's box is propagated by zoo.predict.segment_3d; labels are written by
zoo.formats.write_labels (an npz's as zoo.predict writes `segs`) and the overlay by zoo.overlay. So a download is
what zoo.segment writes for the same boxes (labels 1..N in the list's order, the later object on top).

Each open image is a session with its own folder, its pixels as the model sees them and its slice embeddings
(zoo.predict.SliceEmbeddings, computed when a box first needs a slice), so a box or a click on a slice already seen
runs only the decoder (a small object's first click also embeds its zoom crop, a sparse object's click its focus
crop, zoo.interactive). A volume's box is
[x0, y0, z0, x1, y1, z1] as in zoo.segment's --boxes: the rectangle prompts the middle slice of the range and is
propagated up and down through it, as zoo.predict does.

Safety: binds to 127.0.0.1 unless --host says otherwise (and then warns: there is no login). Uploads are streamed
into the session's folder under a fixed name (the uploaded name is only displayed) and refused beyond
--max-upload-mb; members of a zip are written under numbered names. No endpoint takes a server path. Every folder
lives under one temporary folder, removed on exit. Requests must name a known host (no DNS rebinding) and changes
carry a custom header (no cross-site requests).
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
import webbrowser
import zipfile
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.middleware.trustedhost import TrustedHostMiddleware

from zoo.cli import positive_int, run_cli
from zoo.data.formats import (
    PERCENTILES,
    PICTURE_FORMATS,
    SOFT_TISSUE_WINDOW,
    VOLUME_FORMATS,
    ImageFile,
    file_suffix,
    read_image,
    to_uint8,
    write_labels,
)
from zoo.data.io import Case, CaseError, check_boxes, label_dtype, load_case, save_npz_atomic
from zoo.data.overlay import encode_png, label_colours, overlay_picture
from zoo.data.preprocess import IMAGE_SIZE, box_from_mask, postprocess_logits, scale_boxes
from zoo.index import AUTO
from zoo.interactive import (
    CLICK_MODEL,
    UNTRAINED_CLICKS,
    click_crop,
    decode_on_crop,
    padded_clicks,
    refine_on_focus,
    untrained_clicks,
    whole_frame_logits,
)
from zoo.modalities import MODALITIES, canonical_modality, modality_from_name, modality_id
from zoo.predict import ModalityChoice, SliceEmbeddings, Trace, decode_masks, propagation_plan, segment_3d

DEFAULT_MODEL = AUTO
STATIC_DIR = Path(__file__).with_name("app_static")
# Slice embeddings kept per open image: 128 slices of 4 MB; a box on a slice evicted meanwhile embeds it again.
SESSION_EMBEDDING_BYTES = 512 << 20
MAX_ZIP_MEMBERS = 10_000
MAX_OBJECTS = np.iinfo(np.uint16).max  # the page's label slices are uint16 object ids
# Display presets (level, width) in Hounsfield units, for images whose intensities are HU.
CT_PRESETS = {"soft tissue": SOFT_TISSUE_WINDOW, "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0),
              "brain": (40.0, 80.0), "liver": (60.0, 160.0)}
UPLOAD_SUFFIXES = {*VOLUME_FORMATS, *PICTURE_FORMATS, ".npz", ".zip", ""}  # '': a DICOM file without a suffix
CSRF_HEADER = "x-requested-with"  # changes need it: a cross-site form or image cannot set it


def load_model(name: str):
    """The model --model names ('auto': the champion in this CPU's fastest precision, zoo.index.resolve_model)."""
    from zoo.index import load  # here, so that --help is fast

    return load(name)


def accepts_clicks(model) -> bool:
    """Whether the model's decode takes clicks (zoo.runtime.interface: ClassPromptSAM does, and an exported variant
    with a clicks graph)."""
    return bool(getattr(model, "takes_clicks", False))


def clicks_note(model, name: str) -> str:
    """What the page tells a user about clicks: nothing where a click stage trained the model."""
    if accepts_clicks(model):
        return f"This model ({name}): {UNTRAINED_CLICKS}." if untrained_clicks(model) else ""
    return (f"This model ({name}) does not take clicks yet: its exported folder has no click decoder (issue #31); "
            f"--model {CLICK_MODEL} takes them.")


class AppError(Exception):
    """A request the app refuses: the page shows `message`; the server goes on serving."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def display_name(name: str) -> str:
    """An uploaded file's name as shown and offered for downloads: its last path component, characters other than
    letters, digits, '.', '-', '_' and space replaced, no leading dot. Never used as a path on the server."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._ -]", "_", base).lstrip(". ")[:120]
    return cleaned or "image"


def name_stem(name: str) -> str:
    """'ct.nii.gz' -> 'ct', as zoo.formats.ImageFile.stem does for a file."""
    suffix = file_suffix(name)
    return name[: len(name) - len(suffix)] or "image"


def extract_series(archive: Path, folder: Path, max_bytes: int) -> Path:
    """A zipped DICOM series -> its files written as folder/00000.dcm, 00001.dcm, ... Member names are never used
    (no path leaves the folder), folders are skipped; refused beyond max_bytes unpacked or MAX_ZIP_MEMBERS files."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise AppError(400, f"the zip holds {len(members)} files; at most {MAX_ZIP_MEMBERS} are read")
            unpacked = sum(m.file_size for m in members)  # reading stops at each member's declared size
            if unpacked > max_bytes:
                raise AppError(413, f"the zip unpacks to {unpacked / 2**20:.3g} MB, over the "
                                    f"{max_bytes / 2**20:.3g} MB upload limit (--max-upload-mb)")
            folder.mkdir()
            for i, member in enumerate(members):
                with bundle.open(member) as source, open(folder / f"{i:05d}.dcm", "wb") as target:
                    shutil.copyfileobj(source, target)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as err:
        raise AppError(400, f"not a readable zip ({err})")
    if not members:
        raise AppError(400, "the zip holds no files")
    return folder


@dataclass
class Pixels:
    """An image as the model sees it under one intensity rule, and its slice embeddings.
    pixels: to_uint8's array ((H, W), (H, W, 3) or (D, H, W)); volume: what SliceEmbeddings embeds, (D, H, W) or
    (1, H, W, 3) (a 2D image as zoo.segment hands it to zoo.predict: grey repeated to RGB)."""

    pixels: np.ndarray
    intensity: str
    embeddings: SliceEmbeddings


@dataclass
class SegObject:
    """One object: its box (zoo.segment's --boxes row: [x0, y0, x1, y1], or [x0, y0, z0, x1, y1, z1] on a volume,
    inclusive) and its masks, (H, W) bool by slice (a 2D image's at slice 0; a volume's where it has pixels)."""

    id: int
    box: list[float]
    intensity_key: str | None  # the modality given to to_uint8 (None: the image's own rule)
    modality: str | None
    modality_source: str
    head_modality: str | None
    intensity: str
    prompt_slice: int
    masks: dict[int, np.ndarray]
    clicks: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)  # slice -> [(x, y, 1 | 0)]
    # slice -> its last answer (1, 1, 256, 256), the box's then each click's: the next click's mask prompt, as
    # zoo.interactive.Refinement feeds it back
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    frames: dict[int, object] = field(default_factory=dict)  # slice -> the zoo.interactive.Frame of its logits (a zoom)
    crops: dict[int, tuple] = field(default_factory=dict)  # slice -> its zoom crop (window, embedding, resized)
    # earlier (masks, clicks, logits, frames), for undo
    history: list[tuple[dict, dict, dict, dict]] = field(default_factory=list)

    def snapshot(self) -> None:
        self.history.append((dict(self.masks), {z: list(c) for z, c in self.clicks.items()}, dict(self.logits),
                             dict(self.frames)))

    def summary(self) -> dict:
        slices = sorted(z for z, mask in self.masks.items() if mask.any())
        return {"id": self.id, "colour": list(label_colours(np.array([self.id]))[self.id]), "box": self.box,
                "prompt_slice": self.prompt_slice, "slices": [slices[0], slices[-1]] if slices else None,
                "pixels": int(sum(int(mask.sum()) for mask in self.masks.values())),
                "modality": self.modality, "modality_source": self.modality_source,
                "head_modality": self.head_modality, "intensity": self.intensity,
                "clicks": [[z, x, y, label] for z, points in sorted(self.clicks.items()) for x, y, label in points],
                "undo": len(self.history)}


class Engine:
    """The model, shared by every session; one inference at a time (the CPU's cores are the model's)."""

    def __init__(self, model, name: str):
        self.model = model
        self.name = name
        self.clicks = accepts_clicks(model)
        self.clicks_note = clicks_note(model, name)
        self.lock = threading.Lock()


class ImageSession:
    """One open image: what was read, its pixels and embeddings per intensity rule, and its objects."""

    def __init__(self, engine: Engine, folder: Path, name: str, image: ImageFile | None, case: Case | None):
        self.engine = engine
        self.folder = folder
        self.name = name
        self.image = image  # users' formats
        self.case = case  # a challenge npz
        self.lock = threading.Lock()
        self.rules: dict[str | None, Pixels] = {}
        self.objects: list[SegObject] = []
        self.next_id = 1
        self.work: tuple[SliceEmbeddings, int, int] | None = None  # a box's propagation: embeddings, start, slices
        self.file_modality = image.modality if image is not None else case.modality
        if self.file_modality is None and case is not None:  # load_case read the stored name, not the uploaded one
            self.file_modality = modality_from_name(name)
        self.raw = image.array if image is not None else case.image  # as stored, for the page to window
        self.is_3d = image.is_3d if image is not None else case.is_3d
        self.spatial_shape = self.raw.shape if self.is_3d else self.raw.shape[:2]
        self.depth = self.spatial_shape[0] if self.is_3d else 1
        self.pixels(None)  # the image's own rule: unreadable intensities are refused at opening

    def pixels(self, given: str | None) -> Pixels:
        """The image under to_uint8's rule for the modality `given` (None: the file's or the HU test), made once."""
        if given not in self.rules:
            if self.image is not None:
                pixels, intensity = to_uint8(self.image, given)
            else:
                pixels, intensity = self.case.image, "as stored"
            same = next((p for p in self.rules.values() if p.intensity == intensity), None)
            if same is not None:  # another modality, the same pixels: share the embeddings
                self.rules[given] = same
            else:
                # zoo.segment's case image: a volume, or a 2D image in RGB (grey repeated); embedded as slices
                rgb = pixels if self.is_3d or pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=-1)
                volume = rgb if self.is_3d else rgb[None]
                self.rules[given] = Pixels(pixels, intensity, SliceEmbeddings(self.engine.model, volume,
                                                                               SESSION_EMBEDDING_BYTES))
        return self.rules[given]

    def case_for(self, boxes: np.ndarray, pixels: Pixels) -> Case:
        """The zoo.predict case zoo.segment would build from these boxes."""
        image = pixels.embeddings.volume if self.is_3d else pixels.embeddings.volume[0]
        spacing = self.case.spacing if self.case is not None else self.image.spacing
        return Case(path=Path(self.name), image=image, boxes=boxes, gts=None, spacing=spacing,
                    modality=self.file_modality)

    def info(self) -> dict:
        """What the page needs to show the image; its first window shows what the model sees (to_uint8's rule)."""
        own = self.pixels(None)
        if self.raw.dtype == np.uint8:
            window = (127.5, 255.0)
        elif own.intensity.startswith("window"):  # to_uint8 found Hounsfield units
            window = SOFT_TISSUE_WINDOW
        else:
            low, high = np.percentile(self.raw, PERCENTILES)
            window = ((low + high) / 2, max(high - low, 1e-6))
        return {"name": self.name, "depth": self.depth, "height": self.spatial_shape[-2],
                "width": self.spatial_shape[-1], "channels": 3 if self.raw.ndim == 3 and not self.is_3d else 1,
                "is_3d": self.is_3d, "window": [float(window[0]), float(window[1])],
                "presets": self.raw.dtype != np.uint8 and (self.is_3d or self.raw.ndim == 2),  # grey, beyond 8 bits
                "intensity": own.intensity, "file_modality": self.file_modality,
                "labels_name": self.labels_name(), "overlay_name": self.overlay_name()}

    def labels_name(self) -> str:
        """zoo.segment's output name for this input (ImageFile.labels_name), from the uploaded name."""
        if self.case is not None:
            return f"{name_stem(self.name)}.npz"
        suffix = self.image.labels_name[len(self.image.stem):]  # '.nii.gz', '.png', ...
        return name_stem(self.name) + suffix

    # The image on screen.

    def check_slice(self, z: int) -> int:
        if not 0 <= z < self.depth:
            raise AppError(400, f"slice {z} is outside the image (0..{self.depth - 1})")
        return z

    def display_slice(self, z: int) -> tuple[bytes, str]:
        """Slice z as stored, for the page to window: the bytes of (H, W) or (H, W, 3) uint8, else float32
        little-endian, and which of the two."""
        plane = self.raw[self.check_slice(z)] if self.is_3d else self.raw
        kind = "uint8" if plane.dtype == np.uint8 else "float32"
        return np.ascontiguousarray(plane, dtype="u1" if kind == "uint8" else "<f4").tobytes(), kind

    def overlay_name(self) -> str:
        return f"{name_stem(self.name)}_overlay.png"

    def slice_labels(self, z: int) -> np.ndarray:
        """(H, W) uint16 object ids on slice z; a later object covers an earlier one, as in the saved labels."""
        labels = np.zeros(self.spatial_shape[-2:], np.uint16)
        for obj in self.objects:
            mask = obj.masks.get(self.check_slice(z))
            if mask is not None:
                labels[mask] = obj.id
        return labels

    def label_map(self) -> np.ndarray:
        """The labels to save: object i of the list is label i (1..N), the later one on top, as zoo.segment."""
        labels = np.zeros(self.spatial_shape, label_dtype(len(self.objects)))
        for value, obj in enumerate(self.objects, start=1):
            for z, mask in obj.masks.items():
                (labels[z] if self.is_3d else labels)[mask] = value
        return labels

    # Objects.

    def find(self, oid: int) -> SegObject:
        obj = next((o for o in self.objects if o.id == oid), None)
        if obj is None:
            raise AppError(404, f"no object {oid} in this image (deleted?)")
        return obj

    def add_box(self, box: list[float], choice: str) -> tuple[SegObject, int]:
        """Segment one object from a box (a volume's propagated through its slice range) -> (it, encoder runs)."""
        width = 6 if self.is_3d else 4
        kind = "[x0, y0, z0, x1, y1, z1] (a volume)" if self.is_3d else "[x0, y0, x1, y1] (a 2D image)"
        boxes = np.array([box], dtype=np.float64)
        if boxes.shape[1] != width or not np.isfinite(boxes).all():
            raise AppError(400, f"a box on this image is {kind}; got {box}")
        try:
            check_boxes(Path(self.name), boxes, self.spatial_shape, self.is_3d, inclusive=True)  # the one box rule
            modalities = ModalityChoice(self.engine.model, choice)
        except (CaseError, ValueError) as err:
            raise AppError(400, err.problem if isinstance(err, CaseError) else str(err))
        if len(self.objects) >= MAX_OBJECTS or self.next_id > MAX_OBJECTS:
            raise AppError(409, f"at most {MAX_OBJECTS} objects per image")
        given = None if choice in ("auto", "head") else canonical_modality(choice)
        pixels = self.pixels(given)
        case = self.case_for(boxes, pixels)
        embeddings = pixels.embeddings
        with self.engine.lock, torch.inference_mode():
            before = embeddings.computed
            if self.is_3d:  # zoo.predict's propagation, on this session's cached slice embeddings
                prompt_slice, up, down = propagation_plan(boxes, self.depth)[0]
                self.work = (embeddings, before, len({*up, *down} - set(embeddings.cache)))
                trace = Trace()
                try:
                    result = segment_3d(self.engine.model, case, modalities, embeddings, trace)
                finally:
                    self.work = None
                masks = {z: result.segs[z] == 1 for z in np.flatnonzero(result.segs.reshape(self.depth, -1).any(1))}
                logits = {z: lowres[None] for (_, z), (_, lowres, _) in trace.decoded.items()}
                modality, source, head = result.modality, result.modality_source, result.head_modality
            else:  # zoo.predict.segment_2d's steps, on the cached embedding
                embedding = embeddings[0]
                modality, source, head = modalities.resolve(case, embedding)
                size, answers = self.spatial_shape, []
                masks = {0: decode_masks(self.engine.model, embedding, scale_boxes(boxes, size), modality,
                                         embeddings.resized, size, answers)[0]}
                logits = {0: answers[0][None]}
                prompt_slice = 0
            runs = embeddings.computed - before
        shown = [int(v) if float(v).is_integer() else float(v) for v in box]
        obj = SegObject(self.next_id, shown, given, modality, source, head, pixels.intensity, int(prompt_slice),
                        {int(z): m for z, m in masks.items()}, logits={int(z): v for z, v in logits.items()})
        self.next_id += 1
        self.objects.append(obj)
        return obj, runs

    def progress(self) -> dict:
        """How far the box being propagated is: slices embedded of those it needs (read without the lock)."""
        work = self.work
        if work is None:
            return {"done": 0, "total": 0}
        embeddings, start, total = work
        return {"done": min(embeddings.computed - start, total), "total": total}

    def add_click(self, oid: int, x: float, y: float, z: int, positive: bool) -> tuple[SegObject, int]:
        """Correct an object on slice z with a click; the slice's earlier clicks and last answer go with it, as in
        SAM's interactive loop. The box prompt is the object's own rectangle on its prompt slice (a 2D image's
        always), elsewhere the box around its mask on that slice widened by 3 px, as propagation carries it. A small
        object is decoded on a zoom crop, a sparse one refined on a focus crop around the click, as
        zoo.interactive.Refinement decodes them (zoo.interactive.click_crop; a crop's first click embeds it: one
        encoder run)."""
        engine = self.engine
        if not engine.clicks:
            raise AppError(409, engine.clicks_note)
        obj = self.find(oid)
        height, width = self.spatial_shape[-2:]
        self.check_slice(z)
        if not (0 <= x < width and 0 <= y < height):
            raise AppError(400, f"click ({x:g}, {y:g}) lies outside the image (0..{width - 1}, 0..{height - 1})")
        pixels = self.pixels(obj.intensity_key)
        embeddings = pixels.embeddings
        rectangle = np.array([obj.box[i] for i in ((0, 1, 3, 4) if self.is_3d else (0, 1, 2, 3))])
        carried = None if z == obj.prompt_slice or z not in obj.masks else box_from_mask(obj.masks[z])
        box256 = scale_boxes(rectangle[None], (height, width))[0] if carried is None else carried
        clicks = obj.clicks.get(z, []) + [(float(x), float(y), 1 if positive else 0)]
        scale = IMAGE_SIZE / max(height, width)  # the boxes' factor (zoo.preprocess.scale_boxes), not truncated
        clicks256 = [(cx * scale, cy * scale, label) for cx, cy, label in clicks]
        how, window = click_crop(box256, np.array([c[:2] for c in clicks256]), obj.masks.get(z), (height, width))
        ids = None if obj.modality is None else modality_id(obj.modality)
        previous, frame = obj.logits.get(z), obj.frames.get(z)
        kept = obj.crops.get(z)
        with engine.lock, torch.inference_mode():
            before = embeddings.computed
            if how == "zoom":
                logits, frame, mask, obj.crops[z] = decode_on_crop(engine.model, embeddings.volume[z], window, kept,
                                                                   box256, clicks256, previous, frame, ids)
            else:
                if previous is not None:  # the last answer, carried out of a zoom crop where it was one
                    previous = whole_frame_logits(previous[0], frame, (height, width))[None]
                points, labels = padded_clicks([clicks256])
                logits = engine.model.decode(embeddings[z], torch.as_tensor(box256[None], dtype=torch.float32), ids,
                                             points=points, point_labels=labels, mask_input=previous)
                mask, frame = postprocess_logits(logits, embeddings.resized, (height, width))[0], None
                if how == "focus":  # a sparse object: refined on the crop around the click
                    refined, mask, obj.crops[z] = refine_on_focus(engine.model, embeddings.volume[z], kept, box256,
                                                                  clicks256, logits[0], mask, ids)
                    logits = refined[None]
            runs = embeddings.computed - before + int(obj.crops.get(z) is not kept)
        obj.snapshot()
        obj.masks[z] = mask
        obj.clicks[z] = clicks
        obj.logits[z] = logits
        obj.frames[z] = frame
        return obj, runs

    def undo(self, oid: int) -> SegObject:
        obj = self.find(oid)
        if not obj.history:
            raise AppError(409, f"object {oid} has no change to undo (delete it to remove it)")
        obj.masks, obj.clicks, obj.logits, obj.frames = obj.history.pop()
        return obj

    def delete(self, oid: int) -> None:
        self.objects.remove(self.find(oid))

    # Saving: zoo.segment's writers.

    def labels_file(self) -> Path:
        """The labels in the input's format and geometry, written into the session's folder."""
        if not self.objects:
            raise AppError(409, "no objects to save yet: draw a box first")
        labels = self.label_map()
        out = self.folder / "labels"
        shutil.rmtree(out, ignore_errors=True)
        if self.case is not None:
            return save_npz_atomic(out / "segs.npz", segs=labels)  # as zoo.predict writes segmentations
        return write_labels(labels, self.image, out / self.image.labels_name)

    def overlay_png(self) -> bytes:
        """zoo.segment's --overlay picture, on the pixels of the last object's intensity rule."""
        if not self.objects:
            raise AppError(409, "no objects to draw yet: draw a box first")
        return encode_png(overlay_picture(self.pixels(self.objects[-1].intensity_key).pixels, self.label_map()))


class Sessions:
    """The open images, each in its own folder under `root`; beyond `limit`, the least recently used is closed."""

    def __init__(self, engine: Engine, limit: int):
        self.engine = engine
        self.limit = limit
        self.root: Path | None = None
        self.open: OrderedDict[str, ImageSession] = OrderedDict()
        self.lock = threading.Lock()

    def start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cp-tinyvit-app-"))

    def stop(self) -> None:
        with self.lock:
            self.open.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def new_folder(self) -> Path:
        if self.root is None:
            raise AppError(503, "the server is not started")
        return Path(tempfile.mkdtemp(prefix="session-", dir=self.root))

    def add(self, session: ImageSession) -> str:
        sid = secrets.token_urlsafe(16)
        with self.lock:
            self.open[sid] = session
            while len(self.open) > self.limit:
                _, oldest = self.open.popitem(last=False)
                shutil.rmtree(oldest.folder, ignore_errors=True)
        return sid

    def get(self, sid: str) -> ImageSession:
        with self.lock:
            session = self.open.get(sid)
            if session is None:
                raise AppError(404, "this image is no longer open on the server (closed, or more than "
                                    f"{self.limit} images were opened since): open it again")
            self.open.move_to_end(sid)
            return session

    def close(self, sid: str) -> None:
        with self.lock:
            session = self.open.pop(sid, None)
        if session is not None:
            shutil.rmtree(session.folder, ignore_errors=True)


def read_upload(engine: Engine, folder: Path, stored: Path, name: str, max_bytes: int) -> ImageSession:
    """An uploaded file (already in `folder` as `stored`) -> its session; AppError naming the upload otherwise."""
    try:
        if file_suffix(name) == ".npz":
            return ImageSession(engine, folder, name, None, load_case(stored))
        if file_suffix(name) == ".zip":
            stored = extract_series(stored, folder / "series", max_bytes)
        return ImageSession(engine, folder, name, read_image(stored), None)
    except CaseError as err:
        raise AppError(400, f"{name}: {err.problem}")
    except AppError as err:
        raise AppError(err.status, f"{name}: {err.message}")


# The HTTP layer.

class BoxRequest(BaseModel):
    box: list[float]  # [x0, y0, x1, y1], or [x0, y0, z0, x1, y1, z1] on a volume; inclusive pixel indices
    modality: str = "auto"  # auto, head or a modality name (zoo.predict.ModalityChoice)
    slice: int = 0  # the slice on screen, whose labels the answer carries


class ClickRequest(BaseModel):
    x: float
    y: float
    slice: int = 0
    positive: bool = True


class SliceRequest(BaseModel):
    slice: int = 0


def pack_labels(labels: np.ndarray) -> str:
    """(H, W) uint16 -> base64 of its little-endian bytes (the page's Uint16Array)."""
    return base64.b64encode(labels.astype("<u2").tobytes()).decode("ascii")


def answer(session: ImageSession, z: int, started: float, obj: SegObject | None = None, runs: int = 0) -> dict:
    """Every change's reply: the objects, the labels of the slice on screen, and what the answer cost."""
    return {"objects": [o.summary() for o in session.objects], "object": None if obj is None else obj.id,
            "slice": z, "labels": pack_labels(session.slice_labels(z)), "encoder_runs": runs,
            "server_ms": round((time.perf_counter() - started) * 1000, 1)}


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str]:
    """Host headers accepted: this machine's names when bound to loopback (a web page that makes its own name point
    at 127.0.0.1 is refused); any when served to the network."""
    return ["127.0.0.1", "localhost", "::1", "[::1]"] if loopback(host) else ["*"]


def create_app(engine: Engine, *, max_upload_bytes: int = 1024 << 20, max_sessions: int = 4,
               host: str = "127.0.0.1") -> FastAPI:
    sessions = Sessions(engine, max_sessions)

    @asynccontextmanager
    async def lifespan(app):
        sessions.start()
        try:
            yield
        finally:
            sessions.stop()

    app = FastAPI(title="cp-tinyvit viewer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sessions = sessions
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "cp-tinyvit":
            return JSONResponse({"error": f"missing header {CSRF_HEADER}: cp-tinyvit (requests come from the page)"},
                                status_code=403)
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' blob: data:; "
                                                       "object-src 'none'; frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(AppError)
    async def app_error(request: Request, err: AppError):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse({"error": f"invalid request ({problems})"}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception):
        print(f"error: {request.method} {request.url.path}: {type(err).__name__}: {err}", file=sys.stderr)
        return JSONResponse({"error": f"the server failed on this request ({type(err).__name__}: {err}); "
                                      "it goes on serving"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/info")
    def info():
        return {"model": engine.name, "clicks": engine.clicks, "clicks_note": engine.clicks_note,
                "modalities": list(MODALITIES), "ct_presets": {k: list(v) for k, v in CT_PRESETS.items()},
                "max_upload_mb": max_upload_bytes / 2**20}

    @app.post("/api/images")
    async def open_image(request: Request, name: str):
        """The request's body is the file; `name` (its name on the user's machine) is only displayed."""
        shown = display_name(name)
        suffix = file_suffix(shown)
        if suffix not in UPLOAD_SUFFIXES:
            known = ", ".join(sorted(s for s in UPLOAD_SUFFIXES if s))
            raise AppError(400, f"{shown}: unsupported file type {suffix}; open {known}, or a DICOM file")
        declared = request.headers.get("content-length")
        limit = f"over the {max_upload_bytes / 2**20:.3g} MB upload limit (--max-upload-mb)"
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            raise AppError(413, f"{shown}: {int(declared) / 2**20:.3g} MB, {limit}")
        folder = sessions.new_folder()
        stored = folder / f"upload{suffix}"
        try:
            received = 0
            with open(stored, "wb") as handle:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > max_upload_bytes:
                        raise AppError(413, f"{shown}: {limit}")
                    handle.write(chunk)
            if received == 0:
                raise AppError(400, f"{shown}: the file is empty")
            session = await run_in_threadpool(read_upload, engine, folder, stored, shown, max_upload_bytes)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        sid = sessions.add(session)
        return {"session": sid, **session.info()}

    @app.get("/api/images/{sid}/slices/{z}")
    def slice_pixels(sid: str, z: int):
        data, kind = sessions.get(sid).display_slice(z)
        return Response(data, media_type="application/octet-stream", headers={"X-Pixel-Type": kind})

    @app.get("/api/images/{sid}/progress")
    def progress(sid: str):
        return sessions.get(sid).progress()

    @app.get("/api/images/{sid}/labels/{z}")
    def labels_slice(sid: str, z: int):
        session = sessions.get(sid)
        with session.lock:
            return Response(session.slice_labels(z).astype("<u2").tobytes(), media_type="application/octet-stream")

    @app.post("/api/images/{sid}/objects")
    def add_object(sid: str, body: BoxRequest):
        started = time.perf_counter()
        session = sessions.get(sid)
        with session.lock:
            session.check_slice(body.slice)
            obj, runs = session.add_box(body.box, body.modality)
            return answer(session, body.slice, started, obj, runs)

    @app.post("/api/images/{sid}/objects/{oid}/clicks")
    def add_click(sid: str, oid: int, body: ClickRequest):
        started = time.perf_counter()
        session = sessions.get(sid)
        with session.lock:
            obj, runs = session.add_click(oid, body.x, body.y, body.slice, body.positive)
            return answer(session, body.slice, started, obj, runs) | {"note": engine.clicks_note}

    @app.post("/api/images/{sid}/objects/{oid}/undo")
    def undo(sid: str, oid: int, body: SliceRequest):
        started = time.perf_counter()
        session = sessions.get(sid)
        with session.lock:
            session.check_slice(body.slice)
            return answer(session, body.slice, started, session.undo(oid))

    @app.delete("/api/images/{sid}/objects/{oid}")
    def delete(sid: str, oid: int, slice: int = 0):
        started = time.perf_counter()
        session = sessions.get(sid)
        with session.lock:
            session.check_slice(slice)
            session.delete(oid)
            return answer(session, slice, started)

    @app.get("/api/images/{sid}/labels")
    def download_labels(sid: str):
        session = sessions.get(sid)
        with session.lock:
            path = session.labels_file()
            return Response(path.read_bytes(), media_type="application/octet-stream",
                            headers={"Content-Disposition": f'attachment; filename="{session.labels_name()}"'})

    @app.get("/api/images/{sid}/overlay")
    def download_overlay(sid: str):
        session = sessions.get(sid)
        with session.lock:
            return Response(session.overlay_png(), media_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="{session.overlay_name()}"'})

    @app.delete("/api/images/{sid}")
    def close_image(sid: str):
        sessions.close(sid)
        return {"closed": True}

    return app


# The command.

def host_warning(host: str) -> str | None:
    if loopback(host):
        return None
    return (f"warning: serving on {host}: anyone who can reach this machine can open images and read labels here; "
            "there is no login and no encryption. Use --host 127.0.0.1 (the default) unless that is what you want.")


def open_browser_when_up(url: str, host: str, port: int, timeout: float = 60.0) -> None:
    """Open the page once the server accepts connections (in a thread: uvicorn.run blocks)."""
    def wait_and_open():
        deadline = time.monotonic() + timeout
        target = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        while time.monotonic() < deadline:
            try:
                socket.create_connection((target, port), timeout=1).close()
                webbrowser.open(url)
                return
            except OSError:
                time.sleep(0.2)

    threading.Thread(target=wait_and_open, daemon=True).start()


def run(args: argparse.Namespace) -> None:
    import uvicorn  # here, so that --help is fast

    warning = host_warning(args.host)
    if warning:
        print(warning, file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.model} ...", file=sys.stderr)
    engine = Engine(load_model(args.model), args.model)
    app = create_app(engine, max_upload_bytes=int(args.max_upload_mb * 2**20), max_sessions=args.max_sessions,
                     host=args.host)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else shown}:{args.port}/"
    print(f"cp-tinyvit viewer with {args.model} at {url} (Ctrl-C to stop)", file=sys.stderr)
    if args.open:
        open_browser_when_up(url, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


def positive_megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zoo.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo name or checkpoint path (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; others are warned about)")
    parser.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument("--max-upload-mb", type=positive_megabytes, default=1024.0,
                        help="largest file accepted, and largest unpacked zipped series (default 1024)")
    parser.add_argument("--max-sessions", type=positive_int, default=4,
                        help="open images kept (each with its embeddings); beyond, the least recently used is "
                             "closed (default 4)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
