"""Reading and validating challenge npz files, and writing segmentations atomically.

A challenge npz holds `imgs` (2D: H×W or H×W×3; 3D: D×H×W, uint8), `boxes` (2D rows [x0,y0,x1,y1],
3D rows [x0,y0,z0,x1,y1,z1]) and optionally `gts` (labels 1..N in box order), `spacing` and `modality`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo.modalities import canonical_modality, modality_from_name

# The project's real data, read in place (research-only licenses): ../shared/data/medseg-real/{train,val}, or the
# folder $MEDSEG_DATA names (with train/ and val/ in it): the one rule every command and the tests follow.
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "medseg-real"
DATA_ENV = "MEDSEG_DATA"
# Temporary files of this toolkit are named TEMP_PREFIX<pid>.<final name>.<random>: only its own are ever removed,
# and only those of processes that are gone (one killed mid-write leaves its file behind).
TEMP_PREFIX = ".cp-tinyvit-tmp-"


def data_split(name: str) -> Path:
    """A split of the project's data ('train', 'val'): $MEDSEG_DATA/NAME, else ../shared/data/medseg-real/NAME."""
    return Path(os.environ.get(DATA_ENV) or SHARED_DATA) / name


class CaseError(ValueError):
    """A challenge file that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class WriteError(CaseError):
    """An output that could not be written (a folder in its place, no space, no permission); names the file."""


class OverwriteError(ValueError):
    """An output path that is one of the command's inputs (or the folder holding them)."""


def npz_inputs(folder: str | Path) -> tuple[list[Path], list[Path]]:
    """(the .npz files of `folder`, sorted; every other entry in it, which the tool does not read).

    The entries not read are named on stderr, one line, so that no file is left out silently; the toolkit's own
    temporary files are not counted. CaseError when the folder is missing or holds no .npz file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseError(folder, "no such directory" if not folder.exists() else "not a directory")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(TEMP_PREFIX))
    files = [p for p in entries if p.suffix == ".npz"]
    others = [p for p in entries if p.suffix != ".npz"]
    if others:
        print(f"skipped {len(others)} non-npz file(s): {', '.join(map(str, others))}", file=sys.stderr)
    if not files:
        raise CaseError(folder, "no .npz files in this directory")
    return files, others


def refuse_overwriting_inputs(output: str | Path, inputs: Iterable[str | Path], option: str) -> None:
    """OverwriteError when `output` (a file, or a folder a command writes into) could replace an input: it is an
    input file or folder (links followed), or the folder an input file lies in (output folders receive files named
    like the inputs). Every command checks each of its outputs with it before writing anything."""
    output = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        holds = [source] + ([source.parent] if not source.is_dir() else [])
        for path in holds:
            same = output == path or (output.exists() and path.exists() and os.path.samefile(output, path))
            if same:
                what = "the folder holding the input" if path != source else "the input"
                raise OverwriteError(f"{output}: {option} is {what} {given}; choose another path so that inputs "
                                     "are never overwritten")


@dataclass
class Case:
    """One validated challenge case.

    image: (H, W, 3) uint8 for 2D, (D, H, W) uint8 for 3D.
    boxes: (N, 4) or (N, 6) float64, in pixel (and slice) indices of `image`.
    """

    path: Path
    image: np.ndarray
    boxes: np.ndarray
    gts: np.ndarray | None
    spacing: np.ndarray
    modality: str | None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_3d(self) -> bool:
        return self.boxes.shape[1] == 6


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an npz, read without unpickling; CaseError for anything that is not a readable npz."""
    path = Path(path)
    if not path.exists():
        raise CaseError(path, "file does not exist")
    if not path.is_file():
        raise CaseError(path, "not a regular file (a directory named .npz?)")
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise CaseError(path, "is a single .npy array, not an npz archive")
    if not magic.startswith(b"PK"):
        raise CaseError(path, "not a readable npz: no zip signature (empty, truncated at the start, or another format)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise CaseError(path, "contains a pickled object array; refused (npz files are read without pickle)")
        raise CaseError(path, f"not a readable npz ({err})")
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as err:
        raise CaseError(path, f"not a readable npz, truncated or corrupt ({type(err).__name__}: {err})")
    foreign = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
    if foreign:  # np.load hands back the raw bytes of zip members that are not .npy arrays
        raise CaseError(path, f"a zip archive but not an npz: member {foreign[0]!r} is not a .npy array")
    return arrays


def _check_image(path: Path, imgs: np.ndarray, is_3d: bool) -> np.ndarray:
    """2D or 3D is read from the image's shape and the box columns together; a contradiction is refused."""
    if imgs.dtype.kind == "f" and not np.isfinite(imgs).all():
        raise CaseError(path, "imgs contains NaN or Inf values")
    if imgs.dtype != np.uint8:
        raise CaseError(path, f"imgs has dtype {imgs.dtype}; the challenge format is uint8 (0..255)")
    if imgs.size == 0:
        raise CaseError(path, f"imgs is empty (shape {imgs.shape})")
    if is_3d:
        if imgs.ndim != 3:
            raise CaseError(path, f"3D boxes (6 columns) need imgs of shape D×H×W, got shape {imgs.shape}")
        if imgs.shape[2] == 3:
            raise CaseError(path, f"imgs of shape {imgs.shape} is an H×W×3 color image but boxes have 6 columns "
                                  "(3D); 2D boxes have 4 columns [x0, y0, x1, y1]")
        return imgs
    if imgs.ndim == 2:
        return np.repeat(imgs[:, :, None], 3, axis=-1)
    if imgs.ndim == 3 and imgs.shape[2] == 3:
        return imgs
    if imgs.ndim == 3 and imgs.shape[2] in (2, 4):  # grey + alpha, RGBA: a picture with an alpha channel
        hint = f"; {imgs.shape[2]} channels: drop the alpha channel (the challenge's colour images are H×W×3)"
    else:
        hint = "; a D×H×W volume needs boxes of 6 columns" if imgs.ndim == 3 else ""
    raise CaseError(path, f"2D boxes (4 columns) need imgs of shape H×W or H×W×3, got shape {imgs.shape}{hint}")


def check_boxes(path: Path, boxes: np.ndarray, image_shape: tuple[int, ...], is_3d: bool, inclusive: bool = False,
                names: list[str] | None = None) -> np.ndarray:
    """The one box rule of every command (zoo.predict, zoo.segment, zoo.convert): numbers, at least one, finite, inside
    the image, and spanning at least two columns and two rows (x0 < x1, y0 < y1: a one-pixel box outlines nothing;
    an object of a volume may lie on one slice, z0 <= z1). Boxes
    use inclusive indices; a challenge npz may also end one at the image's size (an exclusive end), `inclusive`
    boxes (users' boxes and label maps) end at size - 1 at most. `names` name the boxes in errors ('box i').
    Returns them as float64."""
    if boxes.dtype.kind not in "iuf":
        raise CaseError(path, f"boxes has dtype {boxes.dtype}; expected numbers")
    if boxes.shape[0] == 0:
        raise CaseError(path, "boxes is empty: at least one box is needed")
    boxes = boxes.astype(np.float64)
    if not np.isfinite(boxes).all():
        raise CaseError(path, "boxes contains NaN or Inf")
    names = names or [f"box {i}" for i in range(len(boxes))]
    if is_3d:
        depth, height, width = image_shape
        lows, highs, limits, axes = boxes[:, :3], boxes[:, 3:], (width, height, depth), "xyz"
    else:
        height, width = image_shape[:2]
        lows, highs, limits, axes = boxes[:, :2], boxes[:, 2:], (width, height), "xy"
    for i, (low, high) in enumerate(zip(lows, highs)):
        for axis, lo, hi, limit in zip(axes, low, high, limits):
            last = limit - 1 if inclusive else limit
            if lo < 0 or hi > last:
                raise CaseError(path, f"{names[i]} {boxes[i].tolist()} lies outside the image ({axis} must be in 0..{last})")
            if lo > hi or (lo == hi and axis != "z"):  # an object may lie on one slice, not on one row or column
                raise CaseError(path, f"{names[i]} {boxes[i].tolist()} spans a single {axis} index or is reversed "
                                      f"({axis}0 >= {axis}1); a box needs {axis}0 < {axis}1")
    return boxes


def load_case(path: str | Path) -> Case:
    """Read and validate one challenge npz; CaseError names the file and the first problem found."""
    path = Path(path)
    arrays = read_npz(path)
    for key in ("imgs", "boxes"):
        if key not in arrays:
            raise CaseError(path, f"missing key {key!r} (keys present: {sorted(arrays)})")
    boxes = arrays["boxes"]
    if boxes.ndim == 1 and boxes.shape[0] in (4, 6):
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] not in (4, 6):
        raise CaseError(path, f"boxes must be N×4 (2D) or N×6 (3D), got shape {boxes.shape}")
    is_3d = boxes.shape[1] == 6
    image = _check_image(path, arrays["imgs"], is_3d)
    boxes = check_boxes(path, boxes, image.shape, is_3d)

    gts = arrays.get("gts")
    if gts is not None:
        if gts.shape != image.shape[: 3 if is_3d else 2]:
            raise CaseError(path, f"gts shape {gts.shape} does not match imgs shape {arrays['imgs'].shape}")
        n_labels = int(gts.max()) if gts.size else 0
        if n_labels != len(boxes):
            raise CaseError(path, f"{len(boxes)} boxes but gts has labels 1..{n_labels}; one box per label is expected")

    spacing = np.asarray(arrays.get("spacing", np.ones(3 if is_3d else 2)), dtype=np.float64).reshape(-1)
    if spacing.shape[0] != (3 if is_3d else 2) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise CaseError(path, f"spacing {spacing.tolist()} must hold {3 if is_3d else 2} positive numbers")

    modality = None
    if "modality" in arrays and arrays["modality"].dtype.kind == "U":
        modality = canonical_modality(str(arrays["modality"]))
    if modality is None:
        modality = modality_from_name(path.name)
    return Case(path=path, image=image, boxes=boxes, gts=gts, spacing=spacing, modality=modality)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale_temps(folder: str | Path, own: bool = False) -> list[Path]:
    """Remove the toolkit's temporary files and staging folders in `folder` left by processes that no longer run
    (a kill -9 leaves them; with `own`, also this process's: on an interrupt); returns them. Others' temporaries and
    those of running processes are kept (a pid reused since by another process keeps them too: never a live one's)."""
    folder = Path(folder)
    removed = []
    for path in sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []:
        pid = path.name[len(TEMP_PREFIX):].split(".", 1)[0]
        if not pid.isdigit() or (_process_alive(int(pid)) and not (own and int(pid) == os.getpid())):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def temp_name(final_name: str) -> str:
    """The name a temporary file or staging folder of this process gets beside `final_name` (a random part is added
    by mkstemp / mkdtemp): clean_stale_temps recognises it by TEMP_PREFIX and the pid."""
    return f"{TEMP_PREFIX}{os.getpid()}.{final_name}."


def interrupted_by(err: BaseException) -> bool:
    """Whether `err` is a KeyboardInterrupt or was raised while one was being handled: an interrupt landing inside a
    library's cleanup (zipfile closing an npz being written: 'Can't close the ZIP file while there is an open writing
    handle') surfaces as another exception, which must still stop the run as Ctrl-C does, not be reported as bad
    input."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


@contextmanager
def held_interrupts(held: list[int]) -> Iterator[None]:
    """Ctrl-C held while the block runs: a SIGINT is recorded in `held` instead of raising KeyboardInterrupt inside
    it (one landing inside zipfile's close once left a half-closed archive, a misleading error and an exit 2 instead
    of 130). Only where SIGINT raises KeyboardInterrupt (Python's default handler, in the main thread; inside an
    outer hold the inner one does nothing); the caller raises it after the block."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path in `path`'s folder to write to; renamed to `path` when the block succeeds, removed when it
    fails. Every file the toolkit writes whole goes through here (only training logs are appended row by row), so
    a half-written file never carries its final name. An OSError while writing becomes a WriteError naming `path`.
    `suffix` ends the temporary name: writers that choose the format by extension (SimpleITK: '.tmp.nii.gz') need
    the final one. Ctrl-C during the block is held until the file is written and renamed (held_interrupts), then
    raised as KeyboardInterrupt: the file being written is finished, never left half."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path.name), suffix=suffix, dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(path, f"cannot be written ({err.strerror or err})") from err
    umask = os.umask(0)
    os.umask(umask)
    held: list[int] = []
    try:
        with held_interrupts(held):
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the final file ordinary permissions
            os.replace(tmp, path)
        if held:  # the file is whole and in place (a checkpoint being saved is kept): now stop
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        if held or interrupted_by(err):
            raise KeyboardInterrupt from err
        if isinstance(err, OSError):
            raise WriteError(path, f"cannot be written ({err.strerror or err})") from err
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)


def label_dtype(n_labels: int) -> np.dtype:
    """The dtype of a label map with labels 1..n_labels: uint8 as the challenge writes it, uint16 beyond 255."""
    if n_labels > np.iinfo(np.uint16).max:
        raise ValueError(f"{n_labels} labels do not fit a uint16 label map")
    return np.dtype(np.uint8 if n_labels <= np.iinfo(np.uint8).max else np.uint16)


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """A compressed npz (never pickled), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, allow_pickle=False, **arrays)
    return Path(path)


def merge_csv_atomic(path: str | Path, rows: list[dict], fields: list[str], key: str) -> list[dict]:
    """Write this run's `rows` into the report `path`, keeping the rows of earlier or concurrent runs into the same
    folder (those whose `key` this run did not redo): two runs into one folder both keep their rows. The read and
    the atomic write happen under an exclusive lock on the folder (flock on the folder itself, so nothing is left
    behind and a killed process releases it): concurrent runs take turns. Returns every row written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError as err:
        raise WriteError(path, f"cannot be written ({err.strerror or err})") from err
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        earlier = []
        if path.is_file():
            try:
                earlier = read_csv(path)
            except (OSError, UnicodeDecodeError, csv.Error) as err:
                print(f"warning: {path}: the earlier report could not be read ({err}); it is replaced by this run's "
                      "rows", file=sys.stderr)
        redone = {row[key] for row in rows}
        merged = [{field: row.get(field) or "" for field in fields} for row in earlier if row.get(key) not in redone]
        merged.extend(rows)
        write_csv_atomic(path, merged, fields)
        return merged
    finally:
        os.close(folder)  # releases the lock


def read_csv(path: str | Path) -> list[dict]:
    """The rows of a CSV with a header row, as dicts of strings."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_csv_atomic(path: str | Path, rows: list[dict], fields: list[str]) -> None:
    """A CSV with a header row, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
