"""Helpers the tests share: small models and teachers built in memory, npz writing, and the bad-input corpus.

`write_corpus(folder)` writes challenge npz files that must be refused, each with the fragment of the one line
that must name it, files that are not npz (named as not read), beside valid but unusual files (a constant image, a
1×1 image, float boxes, a small volume, 300 boxes: uint16 labels) that must still be processed. `assert_reported` checks a command's stderr: one line per bad file, naming the
file and its problem.
"""

from __future__ import annotations

import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file
from segment_anything.modeling import ImageEncoderViT
from timm.models.tiny_vit import Attention

from zoo.models.class_prompt import ClassPromptSAM, ModelConfig
from zoo.models.encoders import TinyViTConfig, TinyViTEncoder

REPO = Path(__file__).resolve().parents[1]


def write_npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


TINY = ModelConfig(encoder=TinyViTConfig(embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1)),
                   class_prompt=True)


TINY_STUDENT = ModelConfig(encoder=TinyViTConfig(embed_dims=(8, 16, 16, 16), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                                                 patch_stride=4))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = ClassPromptSAM(TINY)
    torch.nn.init.normal_(model.class_prompt.weight)
    return model.eval()


SMALL = TinyViTConfig(embed_dims=(16, 32, 32, 48), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 3))


def small_encoder(seed=0) -> TinyViTEncoder:
    torch.manual_seed(seed)
    encoder = TinyViTEncoder(SMALL)
    for m in encoder.modules():  # random BN statistics and attention biases, so that every channel matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
        if isinstance(m, Attention):
            m.attention_biases.data.normal_()
    return encoder.eval()


def small_sam_checkpoint(path, wrap=False):
    """A random-weight SAM-style checkpoint: the real ViT layout (1024² input, 16-px patches, windowed and global
    attention, 256-channel neck) at a tiny width and depth."""
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=1024, patch_size=16, embed_dim=32, depth=3, num_heads=2,
                              global_attn_indexes=(2,), window_size=14, out_chans=256,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True)
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)  # the rest of a SAM checkpoint is ignored
    torch.save({"model": state} if wrap else state, path)
    return encoder


class CountingTeacher:
    def __init__(self):
        self.images = 0

    def embed(self, images):
        self.images += len(images)
        return images.mean(dim=1, keepdim=True).expand(-1, 256, -1, -1)[:, :, ::4, ::4].contiguous()


def _image(h=40, w=60, dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 255, (h, w, 3)).astype(dtype)


def _gts(h=40, w=60):
    gts = np.zeros((h, w), np.uint8)
    gts[5:20, 10:40] = 1
    return gts


BOX = np.array([[10, 5, 39, 19]])

# name -> (arrays, the fragment of the message that must name the problem)
BAD_ARRAYS: dict[str, tuple[dict, str]] = {
    "2DBox_CT_no_imgs.npz": (dict(boxes=BOX, gts=_gts()), "missing key 'imgs'"),
    "2DBox_CT_no_boxes.npz": (dict(imgs=_image(), gts=_gts()), "missing key 'boxes'"),
    "2DBox_CT_4d.npz": (dict(imgs=np.zeros((2, 40, 60, 3), np.uint8), boxes=BOX), "H×W or H×W×3"),
    "2DBox_CT_float64.npz": (dict(imgs=_image(dtype=np.float64), boxes=BOX, gts=_gts()), "dtype float64"),
    "2DBox_CT_int32.npz": (dict(imgs=_image(dtype=np.int32), boxes=BOX, gts=_gts()), "dtype int32"),
    "2DBox_CT_bool.npz": (dict(imgs=_image() > 100, boxes=BOX, gts=_gts()), "dtype bool"),
    "2DBox_CT_uint16.npz": (dict(imgs=_image(dtype=np.uint16), boxes=BOX, gts=_gts()), "dtype uint16"),
    "2DBox_CT_nan.npz": (dict(imgs=np.where(_gts()[..., None] > 0, np.nan, 1.0).repeat(3, -1).astype(np.float32),
                              boxes=BOX, gts=_gts()), "NaN or Inf"),
    "2DBox_CT_inf.npz": (dict(imgs=np.full((40, 60, 3), np.inf, np.float32), boxes=BOX, gts=_gts()), "NaN or Inf"),
    "2DBox_CT_zero_boxes.npz": (dict(imgs=_image(), boxes=np.zeros((0, 4)), gts=np.zeros((40, 60), np.uint8)), "at least one box"),
    "2DBox_CT_negative_box.npz": (dict(imgs=_image(), boxes=np.array([[-4, 5, 39, 19]]), gts=_gts()), "outside the image"),
    "2DBox_CT_box_beyond.npz": (dict(imgs=_image(), boxes=np.array([[10, 5, 70, 19]]), gts=_gts()), "outside the image"),
    "2DBox_CT_x0_after_x1.npz": (dict(imgs=_image(), boxes=np.array([[39, 5, 10, 19]]), gts=_gts()), "x0 >= x1"),
    # H×W×3 with 6-column boxes that fit it read as a volume 3 pixels wide: once segmented silently as (40, 60, 3)
    "2DBox_CT_color_image_3d_boxes.npz": (dict(imgs=_image(), boxes=np.array([[0, 5, 10, 2, 19, 30]])),
                                          "H×W×3 color image but boxes have 6 columns"),
    "3DBox_CT_z0_after_z1.npz": (dict(imgs=np.zeros((6, 20, 30), np.uint8), boxes=np.array([[4, 3, 4, 9, 8, 2]]),
                                      spacing=np.ones(3)), "z0 >= z1"),
}
FILE_PROBLEMS = {  # name -> fragment; written by write_corpus below
    "2DBox_CT_pickled.npz": "pickled object array",
    "2DBox_CT_truncated.npz": "not a readable npz",
    "2DBox_CT_plain_zip.npz": "not an npz",
    "2DBox_CT_directory.npz": "not a regular file",
}
NOT_NPZ = {"notes.txt": "skipped 2 non-npz file(s)", "2DBox_CT_scan.nii.gz": "skipped 2 non-npz file(s)"}
MANY_BOXES = "2DBox_US_300_boxes.npz"  # write_good's case of 300 boxes (uint16 labels)
GOOD_NAMES = ["2DBox_US_valid.npz", "2DBox_US_constant.npz", "2DBox_US_one_pixel.npz", "2DBox_US_float_boxes.npz",
              MANY_BOXES, "3DBox_MR_volume.npz"]


def write_file_problems(folder: Path) -> dict[str, str]:
    """The files that are not readable npz at all (what every command that reads npz files meets first)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "2DBox_CT_pickled.npz", imgs=_image(), boxes=BOX, gts=_gts(),
             extra=np.array([{"run": "code"}], dtype=object))
    valid = write_npz(folder / ".valid.tmp", imgs=_image(), boxes=BOX, gts=_gts())
    (folder / "2DBox_CT_truncated.npz").write_bytes(valid.read_bytes()[:300])
    valid.unlink()
    with zipfile.ZipFile(folder / "2DBox_CT_plain_zip.npz", "w") as archive:
        archive.writestr("readme.txt", "a zip, not an npz")
    (folder / "2DBox_CT_directory.npz").mkdir()
    return dict(FILE_PROBLEMS)


def write_good(folder: Path, many_boxes: bool = True) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    write_npz(folder / "2DBox_US_valid.npz", imgs=_image(), boxes=BOX, gts=_gts())
    write_npz(folder / "2DBox_US_constant.npz", imgs=np.full((40, 60, 3), 9, np.uint8), boxes=BOX, gts=_gts())
    write_npz(folder / "2DBox_US_one_pixel.npz", imgs=np.full((1, 1, 3), 200, np.uint8), boxes=np.array([[0, 0, 1, 1]]),
              gts=np.ones((1, 1), np.uint8))
    write_npz(folder / "2DBox_US_float_boxes.npz", imgs=_image(), boxes=np.array([[10.4, 5.6, 38.7, 19.2]]), gts=_gts())
    if many_boxes:
        gts300 = np.zeros((60, 80), np.uint16)  # 300 objects of 3×3 pixels on a 4-px grid, one box each
        for label in range(1, 301):
            row, col = divmod(label - 1, 20)
            gts300[4 * row : 4 * row + 3, 4 * col : 4 * col + 3] = label
        boxes300 = [[4 * col, 4 * row, 4 * col + 2, 4 * row + 2] for row in range(15) for col in range(20)]
        write_npz(folder / MANY_BOXES, imgs=(gts300 > 0).astype(np.uint8) * 200, boxes=np.array(boxes300), gts=gts300)
    volume = np.random.default_rng(1).integers(0, 255, (11, 24, 32), dtype=np.uint8)
    gts = np.zeros_like(volume)
    gts[2:9, 5:15, 6:20] = 1
    write_npz(folder / "3DBox_MR_volume.npz", imgs=volume, gts=gts, boxes=np.array([[6, 5, 2, 19, 14, 8]]),
              spacing=np.array([2.0, 0.8, 0.8]))
    return [name for name in GOOD_NAMES if many_boxes or name != MANY_BOXES]


def write_not_npz(folder: Path) -> dict[str, str]:
    """Files a command does not read (each must still be named, on the one line listing them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not a case")
    (folder / "2DBox_CT_scan.nii.gz").write_bytes(b"\x1f\x8b not read")
    return dict(NOT_NPZ)


def write_corpus(folder: Path, many_boxes: bool = True) -> tuple[dict[str, str], list[str]]:
    """({name of a bad or unread file: message fragment}, [good file names]) written into `folder`. many_boxes=False
    leaves out the 300-box case: commands that decode every box spend minutes on it with SAM's decoder, and
    tests/zoo/test_predict.py's test_300_boxes_... checks its uint16 labels on a stand-in model."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (arrays, _) in BAD_ARRAYS.items():
        write_npz(folder / name, **arrays)
    bad = {name: fragment for name, (_, fragment) in BAD_ARRAYS.items()}
    bad.update(write_file_problems(folder))
    bad.update(write_not_npz(folder))
    return bad, write_good(folder, many_boxes)


def assert_reported(stderr: str, bad: dict[str, str]) -> None:
    """Each bad file is named on exactly one line of stderr, and that line says its problem."""
    lines = stderr.splitlines()
    for name, fragment in bad.items():
        naming = [line for line in lines if f"/{name}" in line]
        assert len(naming) == 1, f"{name}: expected one line naming it, got {naming}"
        assert fragment in naming[0], f"{name}: {naming[0]!r} does not say {fragment!r}"


def assert_refused(code: int, capsys, fragment: str) -> None:
    """A command ended as bad input ends (zoo.cli.run_main / run_cli): exit code 2 and one `error:` line saying
    `fragment`."""
    err = capsys.readouterr().err
    assert code == 2, f"exit code {code}, stderr: {err}"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], f"expected one error line saying {fragment!r}, got {err!r}"


class _RunsCode:
    """Pickles into a call of os.system: what a booby-trapped model file from a stranger does on torch.load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt file whose unpickling would create `marker` (it must never exist after a command read the file)."""
    import torch

    torch.save({"format": "cp-tinyvit/1", "state_dict": _RunsCode(marker)}, path)
    return path


# Images in users' formats (zoo.data.formats, zoo.segment, zoo.convert) and damaged files (the caches).

def write_volume(path, array, spacing=(0.8, 0.7, 3.0), origin=(10.0, -20.0, 5.0)):
    """(D, H, W) array -> a SimpleITK file; spacing and origin in (x, y, z)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1))  # not the identity: it must be copied, not assumed
    sitk.WriteImage(image, str(path))
    return path


def nifti_header(path):
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return {key: reader.GetMetaData(key) for key in ("srow_x", "srow_y", "srow_z", "qform_code", "sform_code",
                                                      "pixdim[1]", "pixdim[2]", "pixdim[3]")}


def write_dicom_series(series, depth=3):
    """pydicom's CT_small as `depth` slices of one series, 5 mm apart."""
    series.mkdir()
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for z in range(depth):
        dataset.InstanceNumber = z + 1
        dataset.SOPInstanceUID = f"{dataset.SOPInstanceUID.rsplit('.', 1)[0]}.{z + 1}"
        dataset.ImagePositionPatient = [-158.135803, -179.035797, -75.699997 + 5 * z]
        dataset.save_as(series / f"slice{z}.dcm")
    return series


def dicom_slices(folder: Path, positions, uid: str | None = None, orientation=(1, 0, 0, 0, 1, 0), names=None,
                 exist_ok: bool = False) -> Path:
    """pydicom's CT_small as slices of one series at `positions` (mm along the slice normal), in `orientation`
    (ImageOrientationPatient); files slice<i>.dcm unless `names`. What a PACS export holds, gaps and all."""
    folder.mkdir(exist_ok=exist_ok)
    dataset = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if uid:
        dataset.SeriesInstanceUID = uid
    row, column = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, column)
    dataset.ImageOrientationPatient = [float(v) for v in orientation]
    for i, position in enumerate(positions):
        name = names[i] if names else f"slice{i}.dcm"
        dataset.InstanceNumber = i + 1
        dataset.SOPInstanceUID = f"{dataset.SOPInstanceUID.rsplit('.', 1)[0]}.{abs(hash((folder.name, name))) % 10**8}"
        dataset.ImagePositionPatient = [float(v) for v in np.array([-158.1, -179.0, -75.7]) + position * normal]
        dataset.save_as(folder / name)
    return folder


CONCURRENT_DRIVER = """
import importlib, json, os, sys

import zoo.index
from tests.conftest import BrightRuntime

zoo.index.load = lambda name: BrightRuntime()  # the stand-in model, whatever --model says
main = importlib.import_module(sys.argv[1]).main
children = []
for argv in json.loads(sys.argv[2]):
    pid = os.fork()  # from a process that never ran torch: OpenMP's threads do not survive a fork
    if pid == 0:
        code = 3
        try:
            code = main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    children.append(pid)
print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]))
"""


def run_concurrently(module: str, runs: list[list[str]]) -> list[int]:
    """Each argv of `runs` given to `module`'s main() in its own process, all at once (two shells starting two runs
    into one folder), with the stand-in model; their exit codes."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CONCURRENT_DRIVER, module, json.dumps(runs)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def flip_bytes(path: Path, count: int = 1 << 20) -> None:
    """Invert `count` bytes in the middle of a file (at most all but its first 200), keeping its size: what a bad
    disk or a stray write does, and what an unverified .npy would load as valid numbers."""
    data = bytearray(path.read_bytes())
    start = max(200, len(data) // 2 - count // 2)
    end = min(len(data), start + count)
    data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
    path.write_bytes(bytes(data))


def empty_zoo(tmp_path: Path, monkeypatch) -> Path:
    """zoo.index pointed at an empty zoo under tmp_path (index, shipped files, export cache); its index.json."""
    import json

    import zoo.index

    index = tmp_path / "zoo" / "index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"models": []}))
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.index, "ZOO_DIR", index.parent)
    monkeypatch.setattr(zoo.index, "EXPORT_CACHE", tmp_path / "cache")
    return index
