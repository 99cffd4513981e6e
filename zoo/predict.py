"""Segment challenge cases from box prompts: one case (2D, or 3D with slice propagation) and the CLI.

    python -m zoo.predict -i IN -o OUT [--model auto|litemedsam|cp_tinyvit_fast|PATH] [--modality auto|head|CT|...]

2D: one image embedding, every box decoded on it. 3D, as the official LiteMedSAM script: each box starts at its
middle slice and propagates slice by slice up, then down, prompted by the box of the previous slice's mask widened
by 3 px at 256 scale (the original box when that mask is empty). Unlike the official script, each slice is
embedded once and reused for every box. Labels are 1..N in box order; where masks overlap, the later box wins.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zoo.cli import positive_int, run_main
from zoo.data.io import (
    TEMP_PREFIX,
    Case,
    CaseError,
    WriteError,
    clean_stale_temps,
    held_interrupts,
    interrupted_by,
    label_dtype,
    load_case,
    merge_csv_atomic,
    npz_inputs,
    refuse_overwriting_inputs,
    save_npz_atomic,
)
from zoo.data.preprocess import box_from_mask, postprocess_logits, preprocess_image, scale_boxes
from zoo.index import AUTO
from zoo.modalities import MODALITIES, canonical_modality, modality_id
from zoo.runtime.interface import SegmentationRuntime

EMBEDDING_CACHE_BYTES = 1 << 30  # slice embeddings kept for reuse within one volume (256 slices of 4 MB)
DECODE_CHUNK = 16  # boxes decoded at once; bounds memory for images with many objects


@dataclass
class Segmentation:
    segs: np.ndarray  # (H, W) or (D, H, W) labels: uint8, uint16 for more than 255 boxes (zoo.data.io.label_dtype)
    modality: str | None  # the modality given to the class prompt; None for a model without one
    modality_source: str  # 'given', 'file', 'head' or 'unused'
    head_modality: str | None = None  # the modality head's prediction on the first embedded image, if it has one


@dataclass
class Trace:
    """What zoo.interactive refines from: every box's prompt, logits and mask on each slice it was decoded on,
    {(box index, z, None for a 2D image): (256-scale box, (1, 256, 256) logits, (H, W) bool mask)}, and a 2D image's
    embedding with its unpadded 256-frame size."""

    decoded: dict = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    resized: tuple[int, int] | None = None


class ModalityChoice:
    """Which modality a case's class prompt gets: 'auto' (the file's modality, else the head's prediction),
    'head' (always the head's prediction) or a modality name. Models without a class prompt use none."""

    def __init__(self, model: SegmentationRuntime, choice: str = "auto"):
        self.model = model
        self.choice = choice
        if choice not in ("auto", "head") and canonical_modality(choice) is None:
            raise ValueError(f"unknown modality {choice!r}; expected auto, head or one of {', '.join(MODALITIES)}")
        self.uses_modality = model.has_modality_head

    def resolve(self, case: Case, embedding: torch.Tensor) -> tuple[str | None, str, str | None]:
        """(modality for the class prompt, where it came from, the head's prediction). The head is always asked
        when there is one (a 256→11 MLP on the pooled embedding), so its accuracy can be reported per case."""
        if not self.uses_modality:
            return None, "unused", None
        predicted = MODALITIES[int(self.model.predict_modality(embedding).argmax())]
        if self.choice not in ("auto", "head"):
            return canonical_modality(self.choice), "given", predicted
        if self.choice == "auto" and case.modality is not None:
            return case.modality, "file", predicted
        return predicted, "head", predicted


def decode_masks(model, embedding, boxes256: np.ndarray, modality: str | None, resized, original,
                 logits: list | None = None) -> np.ndarray:
    """Boxes (N, 4) at 256 scale -> boolean masks (N, H, W) at the original size; each box's (1, 256, 256) logits
    are appended to `logits` when one is given (zoo.interactive feeds them back as the next step's mask prompt)."""
    ids = None if modality is None else modality_id(modality)
    masks = []
    for start in range(0, len(boxes256), DECODE_CHUNK):
        boxes = torch.as_tensor(boxes256[start : start + DECODE_CHUNK], dtype=torch.float32)
        chunk = model.decode(embedding, boxes, ids)
        if logits is not None:
            logits.extend(chunk)
        masks.append(postprocess_logits(chunk, resized, original))
    return np.concatenate(masks)


def segment_2d(model: SegmentationRuntime, case: Case, modalities: ModalityChoice, trace: Trace | None = None) -> Segmentation:
    """`trace`, when given, receives the embedding and each box's prompt, logits and mask (Trace)."""
    height, width = case.image.shape[:2]
    image, resized = preprocess_image(case.image)
    embedding = model.embed(image)
    modality, source, predicted = modalities.resolve(case, embedding)
    boxes256, logits = scale_boxes(case.boxes, (height, width)), []
    masks = decode_masks(model, embedding, boxes256, modality, resized, (height, width), logits)
    if trace is not None:
        trace.embedding, trace.resized = embedding, resized
        trace.decoded.update({(b, None): (boxes256[b], logits[b], masks[b]) for b in range(len(masks))})
    segs = np.zeros((height, width), dtype=label_dtype(len(case.boxes)))
    for label, mask in enumerate(masks, start=1):
        segs[mask] = label
    return Segmentation(segs, modality, source, predicted)


class SliceEmbeddings:
    """Embeddings of a volume's slices, computed on first use and kept (up to a memory budget) for reuse."""

    def __init__(self, model: SegmentationRuntime, volume: np.ndarray, budget_bytes: int = EMBEDDING_CACHE_BYTES):
        self.model = model
        self.volume = volume
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.budget_bytes = budget_bytes
        self.computed = 0  # how many encoder runs were needed
        self.resized: tuple[int, int] | None = None

    def __getitem__(self, z: int) -> torch.Tensor:
        if z in self.cache:
            self.cache.move_to_end(z)
            return self.cache[z]
        image, self.resized = preprocess_image(self.volume[z])
        embedding = self.model.embed(image)
        self.computed += 1
        self.cache[z] = embedding
        while len(self.cache) * embedding.numel() * embedding.element_size() > self.budget_bytes:
            self.cache.popitem(last=False)
        return embedding


def propagation_plan(boxes: np.ndarray, depth: int) -> list[tuple[int, range, range]]:
    """For each 3D box [x0, y0, z0, x1, y1, z1]: (middle slice, slices of the upward pass, of the downward pass).

    The ranges are the official script's: up from the middle to z1 inclusive; down from the middle - 1 to
    z0 inclusive, except that slice 0 is never reached (its loop stops at max(z0 - 1, 0), exclusive)."""
    plan = []
    for box in boxes:
        z0, z1 = int(box[2]), int(box[5])
        middle = int((z1 - z0) / 2 + z0)
        plan.append((middle, range(middle, min(z1 + 1, depth)), range(middle - 1, max(z0 - 1, 0), -1)))
    return plan


def segment_3d(model: SegmentationRuntime, case: Case, modalities: ModalityChoice,
               embeddings: SliceEmbeddings | None = None, trace: Trace | None = None) -> Segmentation:
    """`trace`, when given, receives each box's prompt, logits and mask on every slice it was decoded on (Trace)."""
    volume = case.image
    depth, height, width = volume.shape
    embeddings = embeddings or SliceEmbeddings(model, volume)
    plan = propagation_plan(case.boxes, depth)
    start_boxes = scale_boxes(case.boxes[:, [0, 1, 3, 4]], (height, width))
    segs = np.zeros(volume.shape, dtype=label_dtype(len(case.boxes)))
    modality, source, predicted = modalities.resolve(case, embeddings[plan[0][0]])

    def sweep(slices_of_box: list[range], previous: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Walk the slices in order; at each, decode every box whose pass includes it, prompted by the box of
        its own mask on the slice before (in walking order). Returns each box's mask on its pass's first slice."""
        first_masks: dict[int, np.ndarray] = {}
        descending = any(slices.step < 0 for slices in slices_of_box)
        for z in sorted({z for slices in slices_of_box for z in slices}, reverse=descending):
            active = [b for b, slices in enumerate(slices_of_box) if z in slices]
            prompts = []
            for b in active:
                carried = box_from_mask(previous[b]) if b in previous else None
                prompts.append(start_boxes[b] if carried is None else carried)
            logits = []
            masks = decode_masks(model, embeddings[z], np.stack(prompts), modality, embeddings.resized, (height, width),
                                 logits)
            if trace is not None:
                trace.decoded.update({(b, z): (prompt, lowres, mask)
                                      for b, prompt, lowres, mask in zip(active, prompts, logits, masks)})
            for b, mask in zip(active, masks):
                label = b + 1
                # The official script carries the box from its label map (values = label), and INTER_AREA's
                # rounding when shrinking it depends on that value: keep it for identical boxes.
                previous[b] = mask.astype(segs.dtype) * label
                first_masks.setdefault(b, previous[b])
                segs[z][mask] = np.maximum(segs[z][mask], label)  # the later (higher) box wins
        return first_masks

    middle_masks = sweep([up for _, up, _ in plan], {})
    sweep([down for _, _, down in plan], dict(middle_masks))
    return Segmentation(segs, modality, source, predicted)


def segment_case(model: SegmentationRuntime, case: Case, modalities: ModalityChoice) -> Segmentation:
    with torch.inference_mode():
        return segment_3d(model, case, modalities) if case.is_3d else segment_2d(model, case, modalities)


TIMING_FIELDS = ["case", "modality", "modality_source", "head_modality", "n_boxes", "seconds", "status", "error"]


def input_files(input_path: Path) -> tuple[list[Path], list[Path]]:
    """(the npz files to segment, the entries of the input folder that are not npz files and are not read)."""
    if input_path.is_file():
        return [input_path], []
    if not input_path.exists():
        raise CaseError(input_path, "no such file or directory")
    return npz_inputs(input_path)


def prepare_output_dir(output_dir: Path) -> None:
    """Create the output folder (only once the model has loaded, so a bad --model leaves none behind), check that
    it is writable, and remove this tool's temporary files that a killed earlier run left there."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f"{TEMP_PREFIX}{os.getpid()}.write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise WriteError(output_dir, f"output directory is not writable ({err.strerror or err})") from err
    stale = clean_stale_temps(output_dir)
    if stale:
        print(f"removed {len(stale)} temporary file(s) left by an interrupted run: {', '.join(map(str, stale))}",
              file=sys.stderr)


def predict_files(model: SegmentationRuntime, files: list[Path], output_dir: Path, modality: str = "auto",
                  progress: bool = True) -> Iterator[dict]:
    """Segment each file into output_dir/<name>, yielding one timing row per file as it is done; a file that cannot
    be read or whose output cannot be written is reported (one line naming it) and the next one follows.

    Ctrl-C stops at once while a case is computed (it leaves no file); while its file is written, it is held until
    the file is renamed into place and its row taken by the caller, so that every file written has its row."""
    modalities = ModalityChoice(model, modality)
    for path in tqdm(files, desc="segmenting", unit="case", disable=not progress):
        row = {"case": path.name, "modality": "", "modality_source": "", "head_modality": "", "n_boxes": "", "seconds": "",
               "status": "ok", "error": ""}
        held: list[int] = []
        try:
            case = load_case(path)
            start = time.perf_counter()
            result = segment_case(model, case, modalities)
            row["seconds"] = f"{time.perf_counter() - start:.3f}"
            row.update(modality=result.modality or case.modality or "", modality_source=result.modality_source,
                       head_modality=result.head_modality or "", n_boxes=len(case.boxes))
            with held_interrupts(held):
                save_npz_atomic(output_dir / path.name, segs=result.segs)
                yield row
        except CaseError as err:  # WriteError, a CaseError, names the output file
            if held or interrupted_by(err):  # Ctrl-C inside a library's cleanup: a stop, not a bad file
                raise KeyboardInterrupt from err
            row.update(status="failed", error=f"{err.path}: {err.problem}")
            tqdm.write(f"error: {err}", file=sys.stderr)
            yield row
        if held:
            raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zoo.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, type=Path, help="a challenge npz file or a directory of them")
    parser.add_argument("-o", "--output", required=True, type=Path, help="directory for one segs npz per case")
    parser.add_argument("--model", default=AUTO,
                        help="'auto' (default: the champion in this CPU's fastest precision, named with why), a zoo name or a checkpoint path")
    parser.add_argument("--modality", default="auto",
                        help="auto (the file's, else the modality head's), head, or one of " + ", ".join(MODALITIES))
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--timing-csv", type=Path, default=None,
                        help="per-case timing CSV (default OUT/timing.csv); runs into one file add their rows to it")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from zoo.index import load  # here, so that --help is fast

    if args.threads:
        torch.set_num_threads(args.threads)
    timing_csv = args.timing_csv or args.output / "timing.csv"
    files, not_read = input_files(args.input)
    for output, option in ((args.output, "-o/--output"), (timing_csv, "--timing-csv")):
        refuse_overwriting_inputs(output, [args.input, *files], option)
    model = load(args.model)
    ModalityChoice(model, args.modality)
    prepare_output_dir(args.output)
    rows, stopped = [], False
    try:
        for row in predict_files(model, files, args.output, args.modality):
            rows.append(row)
    except KeyboardInterrupt:  # the cases done are kept; the one in progress leaves no file
        stopped = True
        clean_stale_temps(args.output, own=True)
    failed = sum(row["status"] != "ok" for row in rows)
    try:  # runs sharing the file (concurrent ones too) each keep their rows; a case done again gets its new row
        merge_csv_atomic(timing_csv, rows, TIMING_FIELDS, key="case")
        timing_written = True
    except WriteError as err:
        print(f"error: {err}", file=sys.stderr)
        timing_written = False
    summary = (f"segmented {len(rows) - failed} of {len(files) + len(not_read)} files into {args.output}"
               + (f"; {failed} failed" if failed else "") + (f"; {len(not_read)} not npz, not read" if not_read else ""))
    if stopped:
        print(f"interrupted: {summary}; {len(files) - len(rows)} not started", file=sys.stderr)
        return 130
    print(summary)
    return 1 if failed or not timing_written else 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(parse_args(argv)))  # Ctrl-C before or after the cases (during them run keeps what was done)


if __name__ == "__main__":
    sys.exit(main())
