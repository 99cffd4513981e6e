import csv
import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.data import get_testdata_file

from tests.helpers import nifti_header, write_dicom_series, write_npz, write_volume
from zoo.data.formats import read_image, tight_boxes
from zoo.data.scoring import case_scores
from zoo.predict import predict_files
from zoo.segment import main, segment_files


@pytest.fixture(scope="module")
def fast_model():
    from zoo.index import load

    return load("cp_tinyvit_fast")


@pytest.fixture
def tiny_checkpoint(tmp_path):
    from tests.helpers import tiny_model
    from zoo.models.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "tiny.pt", tiny_model())


def read_rows(path):
    return {row["input"]: row for row in csv.DictReader(open(path))}


def test_ct_volume_in_hounsfield_units_scores_as_predict_on_the_npz(val_dir, fast_model, tmp_path):
    """A real CT volume (a 5-slice slab, for speed) stored as NIfTI in HU: the same DSC as zoo.predict on its npz."""
    case = np.load(val_dir / "3DBox_CT_IBSISTS_STS032.npz")
    imgs, gts = case["imgs"][24:29], case["gts"][24:29]
    npz = write_npz(tmp_path / "3DBox_CT_slab.npz", imgs=imgs, gts=gts, boxes=tight_boxes(gts), spacing=case["spacing"])
    hounsfield = np.rint(imgs / 255 * 400 + (40 - 200)).astype(np.int16)  # the soft-tissue window undone
    spacing = tuple(float(s) for s in case["spacing"][::-1])
    (tmp_path / "in").mkdir()
    image = write_volume(tmp_path / "in" / "slab.nii.gz", hounsfield, spacing)
    (tmp_path / "masks").mkdir()
    mask = write_volume(tmp_path / "masks" / "slab.nii.gz", gts, spacing)

    list(predict_files(fast_model, [npz], tmp_path / "predicted", modality="CT", progress=False))  # a generator
    rows = segment_files(fast_model, [image], tmp_path / "out", modality="CT", prompt_mask=mask, progress=False)
    assert rows[0]["status"] == "ok" and rows[0]["intensity"] == "window 40,400"
    out = tmp_path / "out" / "slab.nii.gz"
    written = sitk.ReadImage(str(out))
    segs = sitk.GetArrayFromImage(written)
    assert segs.shape == hounsfield.shape and nifti_header(out) == nifti_header(image)
    original = sitk.ReadImage(str(image))
    assert all(getattr(written, g)() == getattr(original, g)() for g in ("GetSpacing", "GetOrigin", "GetDirection"))
    predicted = np.load(tmp_path / "predicted" / npz.name)["segs"]
    dsc_segment, _ = case_scores(gts, segs, case["spacing"])
    dsc_predict, _ = case_scores(gts, predicted, case["spacing"])
    assert dsc_predict > 0.5 and abs(dsc_segment - dsc_predict) <= 0.02, (dsc_segment, dsc_predict)


def test_png_scores_as_predict_on_the_npz(val_dir, fast_model, tmp_path):
    npz = val_dir / "2DBox_CT_COVID19MedSeg_slice005.npz"
    case = np.load(npz)
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(case["imgs"]).save(tmp_path / "in" / "slice.png")
    Image.fromarray(case["gts"] * 40).save(tmp_path / "masks" / "slice.png")  # values 40, 80: kept in the output
    list(predict_files(fast_model, [npz], tmp_path / "predicted", modality="CT", progress=False))  # a generator
    rows = segment_files(fast_model, [tmp_path / "in" / "slice.png"], tmp_path / "out", modality="CT",
                         prompt_mask=tmp_path / "masks", overlay=True, progress=False)
    assert rows[0]["intensity"] == "as stored"
    segs = np.asarray(Image.open(tmp_path / "out" / "slice.png"))
    assert segs.shape == case["gts"].shape and set(np.unique(segs)) <= {0, 40, 80}
    predicted = np.load(tmp_path / "predicted" / npz.name)["segs"]
    assert np.array_equal(segs // 40, predicted)  # the same pixels, so the same DSC
    assert case_scores(case["gts"], segs // 40)[0] == case_scores(case["gts"], predicted)[0]
    overlay = np.asarray(Image.open(tmp_path / "out" / "slice_overlay.png"))
    assert overlay.shape == case["imgs"].shape and (overlay != case["imgs"]).any(axis=-1).sum() > 0


def test_dicom_file_is_segmented_into_a_nifti_of_its_geometry(fast_model, tmp_path):
    dicom = get_testdata_file("CT_small.dcm")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"CT_small.dcm": [[30, 40, 90, 100]]}))
    rows = segment_files(fast_model, [Path(dicom)], tmp_path / "out", boxes_file=boxes,
                         progress=False)
    assert (rows[0]["modality"], rows[0]["modality_source"], rows[0]["intensity"]) == ("CT", "file", "window 40,400")
    written = sitk.ReadImage(str(tmp_path / "out" / "CT_small.nii.gz"))
    source = sitk.ReadImage(dicom)
    assert written.GetSize() == source.GetSize() == (128, 128, 1)
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(written, get)() == pytest.approx(getattr(source, get)(), abs=1e-4), get  # NIfTI stores float32
    labels = sitk.GetArrayFromImage(written)[0]
    assert labels[40:101, 30:91].any() and not labels[:40].any() and not labels[:, :30].any()  # inside its box


def test_box_axes_are_column_row_slice(bright_runtime, tmp_path):
    volume = np.zeros((8, 40, 256), np.uint8)  # 256 wide: the stand-in model works at scale 1
    volume[2:6, 10:20, 30:50] = 255  # slices 2..5, rows 10..19, columns 30..49
    image = write_volume(tmp_path / "vol.nii.gz", volume)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"vol.nii.gz": [[30, 10, 2, 49, 19, 5]]}))
    segment_files(bright_runtime, [image], tmp_path / "out", boxes_file=boxes, progress=False)
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "vol.nii.gz"))), volume // 255)
    boxes.write_text(json.dumps({"vol.nii.gz": [[10, 30, 2, 19, 49, 5]]}))  # x and y swapped: y 49 > 39
    rows = segment_files(bright_runtime, [image], tmp_path / "swapped", boxes_file=boxes, progress=False)
    assert "box 0 [10.0, 30.0, 2.0, 19.0, 49.0, 5.0] lies outside the image (y must be in 0..39)" in rows[0]["error"]


def test_prompt_mask_values_are_kept_and_a_volume_overlay_is_a_montage(bright_runtime, tmp_path):
    volume = np.zeros((6, 32, 256), np.uint8)
    volume[1:4, 4:12, 4:12] = 200
    volume[2:6, 20:30, 30:44] = 200
    mask = np.zeros_like(volume)
    mask[1:4, 4:12, 4:12] = 9
    mask[2:6, 20:30, 30:44] = 4
    volume[4, 2:6, 100:120], mask[4, 2:6, 100:120] = 200, 5  # one slice: a 3D box with z0 == z1
    (tmp_path / "in").mkdir()
    image = write_volume(tmp_path / "in" / "v.mha", volume)
    mask_path = write_volume(tmp_path / "mask.mha", mask)
    rows = segment_files(bright_runtime, [image], tmp_path / "out", prompt_mask=mask_path, overlay=True, progress=False)
    assert rows[0]["n_objects"] == 3 and rows[0]["modality_source"] == "unused"
    assert np.array_equal(read_image(tmp_path / "out" / "v.mha").array, mask)
    montage = np.asarray(Image.open(tmp_path / "out" / "v_overlay.png"))
    assert montage.shape == (2 * 32, 3 * 256, 3)  # slices 1..5 hold labels: 3 columns, 2 rows
    assert (montage[..., 0] != montage[..., 1]).any()  # coloured contours over the grey slices


def test_bad_inputs_are_reported_one_line_each_and_the_rest_segmented(tiny_checkpoint, tmp_path, capsys):
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir()
    masks.mkdir()
    picture = np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)
    good = np.zeros((40, 50), np.uint8)
    good[5:20, 10:30] = 1
    for name, mask in {"good.png": good, "shape.png": good[:30], "empty.png": good * 0}.items():
        Image.fromarray(picture).save(inputs / name)
        Image.fromarray(mask).save(masks / name)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (inputs / "notes.txt").write_text("not an image")
    Image.fromarray(picture).save(inputs / "no_mask.jpg")
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}

    code = main([str(inputs), "-o", str(tmp_path / "out"), "--prompt-mask", str(masks), "--model", str(tiny_checkpoint),
                 "--overlay", "--threads", "1"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 5, err
    for name, problem in {"shape.png": "prompt mask shape (30, 50) differs from the image's (40, 50)",
                          "empty.png": "is empty: no labelled pixels", "broken.png": "not a readable png image",
                          "notes.txt": "unsupported file type .txt", "no_mask.jpg": "no prompt mask named"}.items():
        assert any(name in line and problem in line for line in lines), (name, err)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "good_overlay.png", "segment.csv"]
    rows = read_rows(tmp_path / "out" / "segment.csv")
    assert rows["good.png"]["status"] == "ok"
    assert rows["good.png"]["modality_source"] == "head"  # auto: the head decides
    assert rows["good.png"]["modality"] == rows["good.png"]["head_modality"] != ""
    assert rows["broken.png"]["status"] == "failed"
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # inputs untouched

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"good.png": [[10, 5, 60, 19]]}))
    assert main([str(inputs / "good.png"), "-o", str(tmp_path / "out2"), "--boxes", str(boxes),
                 "--model", str(tiny_checkpoint)]) == 1
    assert "good.png: box 0 [10.0, 5.0, 60.0, 19.0] lies outside the image" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "good.png").exists()
    assert main([str(inputs), "-o", str(inputs), "--prompt-mask", str(masks), "--model", str(tiny_checkpoint)]) == 2
    assert "inputs are never overwritten" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before


def test_two_inputs_with_one_output_name_are_not_written_over(bright_runtime, tmp_path):
    (tmp_path / "in").mkdir()
    picture = np.zeros((20, 30), np.uint8)
    picture[5:10, 5:15] = 255
    Image.fromarray(picture).save(tmp_path / "in" / "a.jpg", quality=100)
    Image.fromarray(picture).save(tmp_path / "in" / "a.png")
    Image.fromarray((picture > 0).astype(np.uint8)).save(tmp_path / "mask.png")  # one mask serves both
    rows = segment_files(bright_runtime, sorted((tmp_path / "in").iterdir()), tmp_path / "out",
                         prompt_mask=tmp_path / "mask.png", progress=False)
    assert [row["status"] for row in rows] == ["ok", "failed"]  # a.jpg wrote a.png first
    assert "already written for another input" in rows[1]["error"]


def test_dicom_series_is_segmented_into_a_nifti_of_the_series_geometry(bright_runtime, tmp_path):
    series = write_dicom_series(tmp_path / "scan")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"scan": [[20, 20, 0, 100, 100, 2]]}))
    rows = segment_files(bright_runtime, [series], tmp_path / "out", boxes_file=boxes, progress=False)
    assert rows[0]["output"] == "scan.nii.gz" and rows[0]["intensity"] == "window 40,400"
    written = sitk.ReadImage(str(tmp_path / "out" / "scan.nii.gz"))
    source = read_image(series).geometry
    assert written.GetSize() == source.GetSize() == (128, 128, 3)
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(written, get)() == pytest.approx(getattr(source, get)(), abs=1e-4), get
    assert sitk.GetArrayFromImage(written)[1:, 20:101, 20:101].any()


def test_points_refine_the_boxes_masks_click_by_click_and_may_start_without_a_box(stand_in, tmp_path, capsys):
    """--points in the --boxes convention: label N is box N; fg and bg clicks ([x, y], column and row) replay in order;
    a label without a box starts box-free from the whole image; a bad click is named; a model without clicks refused."""
    from tests.zoo.test_interactive import ClickingRuntime

    picture = np.zeros((64, 64), np.uint8)
    picture[10:40, 10:40] = 200
    picture[20:26, 20:26] = 60  # a dark hole the box's mask misses
    Image.fromarray(picture).save(tmp_path / "p.png")
    other = np.zeros((64, 64), np.uint8)
    other[40:60, 2:40] = 200  # an object given no box
    Image.fromarray(other).save(tmp_path / "q.png")
    boxes, points = tmp_path / "boxes.json", tmp_path / "points.json"
    boxes.write_text(json.dumps({"p.png": [[9, 9, 40, 40]], "q.png": [[60, 0, 63, 3]]}))
    points.write_text(json.dumps({"p.png": [{"label": 1, "fg": [[22, 23]]}],
                                  "q.png": [{"label": 3, "fg": [[8, 54]], "bg": [[30, 50]]}]}))
    model = ClickingRuntime()
    rows = segment_files(model, [tmp_path / "p.png", tmp_path / "q.png"], tmp_path / "out", boxes_file=boxes,
                         points_file=points, progress=False)
    assert "trained on boxes alone" not in capsys.readouterr().err  # the stand-in's clicks are trained
    assert [r["status"] for r in rows] == ["ok", "ok"] and [r["n_clicks"] for r in rows] == [1, 2]
    assert (np.asarray(Image.open(tmp_path / "out" / "p.png"))[10:40, 10:40] == 1).all()  # the hole filled
    labels = np.asarray(Image.open(tmp_path / "out" / "q.png"))
    assert rows[1]["n_objects"] == 2 and labels[54, 8] == 3 and labels[50, 30] == 0  # box-free: label 3, its bg click
    plain = segment_files(model, [tmp_path / "p.png"], tmp_path / "plain", boxes_file=boxes, progress=False)
    points.write_text(json.dumps({"p.png": [{"label": 1, "fg": [[22, 23]]}]}))
    assert plain[0]["n_clicks"] == 0 and not np.asarray(Image.open(tmp_path / "plain" / "p.png"))[22, 22]

    points.write_text(json.dumps({"p.png": [{"label": 1, "fg": [[70, 3]]}]}))
    rows = segment_files(model, [tmp_path / "p.png"], tmp_path / "o2", boxes_file=boxes, points_file=points, progress=False)
    assert "label 1: click [70.0, 3.0] lies outside the image (64 x 64)" in rows[0]["error"]
    points.write_text(json.dumps({"p.png": [{"label": 2, "bg": [[5, 3]]}]}))
    rows = segment_files(model, [tmp_path / "p.png"], tmp_path / "o3", boxes_file=boxes, points_file=points, progress=False)
    assert "label 2 has no box: a box-free start needs an fg click" in rows[0]["error"]
    points.write_text(json.dumps({"p.png": [{"label": 1, "fg": [[22, 23]]}]}))
    rows = segment_files(ClickingRuntime.__mro__[1](), [tmp_path / "p.png"], tmp_path / "o4", boxes_file=boxes,
                         points_file=points, progress=False)
    assert "this model takes no clicks" in rows[0]["error"]
    capsys.readouterr()
    model.clicks_trained = False  # a decoder no click stage trained: clicks still run, with a warning, once a run
    segment_files(model, [tmp_path / "p.png", tmp_path / "q.png"], tmp_path / "untrained", boxes_file=boxes,
                  points_file=points, progress=False)
    assert capsys.readouterr().err.count("warning: --points: its decoder was trained on boxes alone") == 1
    assert main([str(tmp_path / "p.png"), "-o", str(tmp_path / "o5"), "--boxes", str(boxes), "--points",
                 str(tmp_path / "nope.json")] + stand_in) == 2
    assert "nope.json: not a readable JSON file" in capsys.readouterr().err


# Reliability round 3 (#33): each probe of the issue, with its outcome now.

@pytest.fixture
def stand_in(bright_runtime, monkeypatch):
    """zoo.segment's command loads the stand-in model (BrightRuntime) whatever --model says."""
    import zoo.index

    monkeypatch.setattr(zoo.index, "load", lambda name: bright_runtime)
    return ["--model", "stand-in"]


def test_a_prompt_mask_with_the_opposite_x_axis_prompts_the_right_side(stand_in, tmp_path):
    """Another tool's mask of the same anatomy stored with x the other way round: used voxel for voxel it put every
    box on the mirror side (DSC 0, exit 0); it is resampled into the image's frame now (DSC 1, a note)."""
    shape = (256, 24, 5)  # nibabel (x, y, z); 256 wide: the stand-in model works at scale 1
    affine = np.diag([-0.7, -0.7, 3.0, 1.0])
    volume, truth = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    volume[20:60, 5:15, 1:4] = truth[20:60, 5:15, 1:4] = 1
    volume[196:236, 5:15, 1:4] = 1  # an object where the mirrored box would fall: prompted, it would be segmented
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1
    (tmp_path / "in").mkdir()
    nibabel.save(nibabel.Nifti1Image(volume * 255, affine), tmp_path / "in" / "ct.nii.gz")
    nibabel.save(nibabel.Nifti1Image(truth[::-1].copy() * 7, affine @ flip), tmp_path / "mask.nii.gz")
    assert main([str(tmp_path / "in" / "ct.nii.gz"), "-o", str(tmp_path / "out"), "--prompt-mask",
                 str(tmp_path / "mask.nii.gz")] + stand_in) == 0
    labels = np.asanyarray(nibabel.load(tmp_path / "out" / "ct.nii.gz").dataobj)
    dsc, _ = case_scores(truth.transpose(2, 1, 0), (labels == 7).astype(np.uint8).transpose(2, 1, 0),
                         np.array([3.0, 0.7, 0.7]))
    assert dsc == 1.0 and not labels[196:236].any()
    row = read_rows(tmp_path / "out" / "segment.csv")["ct.nii.gz"]
    assert row["status"] == "ok" and "mask.nii.gz is in another frame: resampled" in row["notes"]


def test_a_one_pixel_box_is_refused_as_zoo_predict_refuses_it(bright_runtime, tmp_path):
    Image.fromarray(np.full((20, 30), 200, np.uint8)).save(tmp_path / "a.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[5, 5, 5, 5]]}))
    rows = segment_files(bright_runtime, [tmp_path / "a.png"], tmp_path / "out", boxes_file=boxes, progress=False)
    assert rows[0]["status"] == "failed" and "spans a single x index" in rows[0]["error"]
    assert not (tmp_path / "out" / "a.png").exists()


def test_boxes_json_takes_a_bom_refuses_what_is_not_a_whole_number_and_names_unknown_keys(stand_in, tmp_path, capsys):
    picture = np.zeros((20, 30), np.uint8)
    picture[5:10, 5:15] = 255
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        Image.fromarray(picture).save(tmp_path / "in" / name)
    boxes = tmp_path / "boxes.json"
    entries = {"a.png": [[5, 5, 14, 9]], "b.png": [["5", 5, 14, 9]], "c.png": [[5.5, 5, 14, 9]],
               "d.png": [[True, 5, 14, 9]], "in/a.png": [[1, 1, 3, 3]], "e.png": [[1, 1, 3, 3]]}
    boxes.write_bytes(b"\xef\xbb\xbf" + json.dumps(entries).encode())  # a BOM, as Notepad writes one
    assert main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--boxes", str(boxes)] + stand_in) == 1
    err = capsys.readouterr().err
    assert "coordinates must be JSON numbers, not str '5'" in err and "b.png" in err
    assert "5.5 is not a whole number; boxes are inclusive voxel indices" in err
    assert "not bool True" in err
    (warning,) = [line for line in err.splitlines() if line.startswith("warning:")]
    assert "no input is named 'in/a.png', 'e.png'" in warning
    rows = read_rows(tmp_path / "out" / "segment.csv")
    assert [rows[name]["status"] for name in ("a.png", "b.png", "c.png", "d.png")] == ["ok", "failed", "failed",
                                                                                      "failed"]


def test_a_photo_with_an_exif_rotation_is_segmented_as_viewers_show_it(stand_in, tmp_path, capsys):
    shown = np.zeros((30, 50), np.uint8)  # what every viewer shows: 30 rows, 50 columns
    shown[5:12, 10:30] = 255
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned the other way; orientation 8 turns it back for display
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, k=-1))).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"photo.jpg": [[8, 3, 32, 14]]}))  # drawn on the picture as shown
    assert main([str(tmp_path / "photo.jpg"), "-o", str(tmp_path / "out"), "--boxes", str(boxes)] + stand_in) == 0
    labels = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert labels.shape == shown.shape and np.array_equal(labels > 0, shown > 0)
    assert "note: photo.jpg: turned 90° counter-clockwise as its EXIF orientation (8) says" in capsys.readouterr().err


def test_dicom_folders_say_what_they_hold(stand_in, tmp_path, capsys):
    """Two series in a folder: one line naming both (it was 16 lines of 'no boxes for IM0000.dcm'); a series with
    a README: one input, the README named (it was split into separate 2D inputs); a gap: refused, named."""
    from tests.helpers import dicom_slices

    study = dicom_slices(tmp_path / "study", positions=range(0, 40, 5), uid="1.2.826.0.9.1")
    dicom_slices(study, positions=range(0, 40, 5), uid="1.2.826.0.9.2", names=[f"IM{i:04d}.dcm" for i in range(8)],
                 exist_ok=True)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"scan": [[20, 20, 0, 100, 100, 2]], "gap": [[20, 20, 0, 100, 100, 2]]}))
    assert main([str(study), "-o", str(tmp_path / "out"), "--boxes", str(boxes)] + stand_in) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {study}: 2 series found") and "1.2.826.0.9.1" in line and "1.2.826.0.9.2" in line

    scan = dicom_slices(tmp_path / "scan", positions=[0, 5, 10])
    (scan / "README.txt").write_text("exported by the PACS")
    assert main([str(scan), "-o", str(tmp_path / "out"), "--boxes", str(boxes)] + stand_in) == 0
    assert "note: scan: skipped 1 file(s) that are not DICOM: README.txt" in capsys.readouterr().err
    assert read_rows(tmp_path / "out" / "segment.csv")["scan"]["notes"] == "skipped 1 file(s) that are not DICOM: " \
                                                                          "README.txt"
    gap = dicom_slices(tmp_path / "gap", positions=[0, 5, 15])
    assert main([str(gap), "-o", str(tmp_path / "out"), "--boxes", str(boxes)] + stand_in) == 1
    assert "a gap of 10 mm between slice1.dcm and slice2.dcm" in capsys.readouterr().err
    assert not (tmp_path / "out" / "gap.nii.gz").exists()


def test_a_killed_run_leaves_temporary_files_that_the_next_run_removes(stand_in, tmp_path, capsys):
    import subprocess as sp

    from zoo.data.io import TEMP_PREFIX

    picture = np.zeros((20, 30), np.uint8)
    picture[5:10, 5:15] = 255
    Image.fromarray(picture).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    gone = sp.Popen(["true"])
    gone.wait()
    stale = out / f"{TEMP_PREFIX}{gone.pid}.ct.nii.gz.x1y2z3.tmp.nii.gz"  # what kill -9 during a write leaves
    alive = out / f"{TEMP_PREFIX}{os.getppid()}.other.png.abcdef.tmp.png"  # a running writer's: kept
    stale.touch(), alive.touch()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"a.png": [[5, 5, 14, 9]]}))
    assert main([str(tmp_path / "a.png"), "-o", str(out), "--boxes", str(boxes)] + stand_in) == 0
    assert not stale.exists() and alive.exists() and str(stale) in capsys.readouterr().err


def test_two_runs_into_one_folder_both_keep_their_report_rows(tmp_path):
    """Two processes segmenting into one OUT at once: segment.csv held one run's rows; it holds both now."""
    from tests.helpers import run_concurrently

    boxes = tmp_path / "boxes.json"
    entries = {}
    for run in ("first", "second"):
        (tmp_path / run).mkdir()
        for i in range(6):
            Image.fromarray(np.full((20, 30), 200, np.uint8)).save(tmp_path / run / f"{run}{i}.png")
            entries[f"{run}{i}.png"] = [[2, 2, 20, 15]]
    boxes.write_text(json.dumps(entries))
    runs = [[str(tmp_path / run), "-o", str(tmp_path / "out"), "--boxes", str(boxes), "--model", "stand-in",
             "--threads", "1"] for run in ("first", "second")]
    assert run_concurrently("zoo.segment", runs) == [0, 0]  # each only warns of the other's keys
    rows = read_rows(tmp_path / "out" / "segment.csv")
    assert sorted(rows) == sorted(entries) and {row["status"] for row in rows.values()} == {"ok"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(entries) + ["segment.csv"]
