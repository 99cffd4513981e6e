"""zoo.app's API through FastAPI's test client: a box's mask and the saved labels equal zoo.segment's on the same
boxes (a val PNG, a NIfTI made from a val CT volume), saved labels read back in the input's geometry, clicks and
undo, and what must be refused (bad files and boxes, path traversal, oversized uploads, other sites)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import nifti_header, write_dicom_series, write_npz, write_volume
from zoo.app import Engine, create_app, display_name, host_warning, parse_args
from zoo.data.formats import read_image, tight_boxes
from zoo.segment import segment_files

HEADERS = {"X-Requested-With": "cp-tinyvit"}
PNG_CASE = "2DBox_CT_COVID19MedSeg_slice097.npz"  # grey, 2 objects
CT_CASE = "3DBox_CT_IBSISTS_STS032.npz"


@pytest.fixture(scope="module")
def fast_model():
    from zoo.index import load

    return load("cp_tinyvit_fast")


def client_for(model, name="cp_tinyvit_fast", **options) -> TestClient:
    """A test client of the app, as the page talks to it (its host, its header); `with` runs start and exit."""
    return TestClient(create_app(Engine(model, name), **options), base_url="http://127.0.0.1", headers=HEADERS)


def open_file(client, path: Path, name: str | None = None):
    return client.post("/api/images", params={"name": name or path.name}, content=path.read_bytes())


def labels_of(reply: dict, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(reply["labels"]), "<u2").reshape(shape)


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


def grey_png(folder: Path, pixels: np.ndarray, name: str = "slice.png") -> Path:
    path = folder / name
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def png_case(val_dir, tmp_path_factory):
    """A val CT slice as an 8-bit grey PNG, its ground truth and tight boxes."""
    case = np.load(val_dir / PNG_CASE)
    folder = tmp_path_factory.mktemp("png")
    return grey_png(folder, case["imgs"][..., 0]), case["gts"], tight_boxes(case["gts"])


def test_png_boxes_give_zoo_segments_masks_and_files(png_case, fast_model, tmp_path):
    png, gts, boxes = png_case
    (tmp_path / "boxes.json").write_text(json.dumps({png.name: boxes.tolist()}))
    segment_files(fast_model, [png], tmp_path / "cli", boxes_file=tmp_path / "boxes.json", overlay=True,
                  progress=False)
    expected = np.asarray(Image.open(tmp_path / "cli" / png.name))
    with client_for(fast_model) as client:
        opened = open_file(client, png).json()
        assert (opened["height"], opened["width"], opened["depth"], opened["is_3d"]) == (*gts.shape, 1, False)
        assert opened["labels_name"] == png.name and opened["intensity"] == "as stored"
        sid = opened["session"]
        answers = [client.post(f"/api/images/{sid}/objects", json={"box": box}).json() for box in boxes.tolist()]
        assert [a["encoder_runs"] for a in answers] == [1, 0]  # the second box ran only the decoder
        shown = labels_of(answers[-1], gts.shape)
        ids = [o["id"] for o in answers[-1]["objects"]]
        for value, oid in enumerate(ids, start=1):
            assert np.array_equal(shown == oid, expected == value)  # each mask as zoo.segment's, identical
        saved = client.get(f"/api/images/{sid}/labels")
        assert saved.headers["content-disposition"] == f'attachment; filename="{png.name}"'
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(saved.content))), expected)
        overlay = client.get(f"/api/images/{sid}/overlay")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(overlay.content))),
                              np.asarray(Image.open(tmp_path / "cli" / "slice_overlay.png")))

        # Clicks: the untrained decoder's answer, said so; undo gives the box's mask back, exactly.
        first = ids[0]
        x0, y0, x1, y1 = boxes[0]
        click = client.post(f"/api/images/{sid}/objects/{first}/clicks",
                            json={"x": int(x0 + x1) // 2, "y": int(y0 + y1) // 2, "positive": False})
        reply = click.json()
        assert click.status_code == 200 and "trained on boxes alone" in reply["note"]
        assert reply["objects"][0]["clicks"] == [[0, float(int(x0 + x1) // 2), float(int(y0 + y1) // 2), 0]]
        assert reply["encoder_runs"] == 1  # the lesions cover under half of their box: a focus crop, embedded
        undone = client.post(f"/api/images/{sid}/objects/{first}/undo", json={}).json()
        assert np.array_equal(labels_of(undone, gts.shape), shown) and undone["objects"][0]["clicks"] == []
        assert "no change to undo" in error_of(client.post(f"/api/images/{sid}/objects/{first}/undo", json={}), 409)
        deleted = client.delete(f"/api/images/{sid}/objects/{ids[1]}").json()
        assert [o["id"] for o in deleted["objects"]] == [first]
        remaining = labels_of(deleted, gts.shape)
        assert (remaining[expected == 1] == first).all()
        assert (remaining == first).sum() == deleted["objects"][0]["pixels"]
        assert not remaining[(expected == 2) & (remaining == 0)].any()


@pytest.fixture(scope="module")
def ct_volume(val_dir, tmp_path_factory):
    """A 3-slice slab of a val CT volume stored as NIfTI in Hounsfield units, and its 3D box."""
    case = np.load(val_dir / CT_CASE)
    imgs, gts = case["imgs"][25:28], case["gts"][25:28]
    hounsfield = np.rint(imgs / 255 * 400 + (40 - 200)).astype(np.int16)  # the soft-tissue window undone
    folder = tmp_path_factory.mktemp("ct")
    path = write_volume(folder / "slab.nii.gz", hounsfield, tuple(float(s) for s in case["spacing"][::-1]))
    return path, gts, tight_boxes(gts)[0]


def test_volume_box_propagates_as_zoo_segment_and_saves_in_the_inputs_geometry(ct_volume, fast_model, tmp_path):
    nifti, gts, box = ct_volume
    (tmp_path / "boxes.json").write_text(json.dumps({nifti.name: [box.tolist()]}))
    segment_files(fast_model, [nifti], tmp_path / "cli", modality="CT", boxes_file=tmp_path / "boxes.json",
                  progress=False)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "cli" / nifti.name)))
    with client_for(fast_model) as client:
        opened = open_file(client, nifti).json()
        assert opened["is_3d"] and opened["depth"] == 3 and opened["presets"]
        sid = opened["session"]
        reply = client.post(f"/api/images/{sid}/objects", json={"box": box.tolist(), "modality": "CT", "slice": 2})
        reply = reply.json()
        obj = reply["objects"][0]
        assert (obj["modality"], obj["modality_source"], obj["intensity"]) == ("CT", "given", "window 40,400")
        # From the middle of slices 0..2, up to 2 and down to 1: zoo.predict never reaches slice 0 (the official
        # script's downward loop stops before it), so two slices were embedded.
        assert obj["prompt_slice"] == 1 and reply["encoder_runs"] == 2 and obj["slices"] == [1, 2]
        assert np.array_equal(labels_of(reply, gts.shape[1:]) == obj["id"], expected[2] == 1)
        again = client.post(f"/api/images/{sid}/objects", json={"box": box.tolist(), "modality": "CT"}).json()
        assert again["encoder_runs"] == 0
        client.delete(f"/api/images/{sid}/objects/{again['object']}")
        saved = client.get(f"/api/images/{sid}/labels")
        (tmp_path / "app.nii.gz").write_bytes(saved.content)

    # Reloaded: zoo.segment's labels, in the input's geometry.
    reloaded = read_image(tmp_path / "app.nii.gz", labels=True)
    assert np.array_equal(reloaded.array, expected) and expected.any()
    assert nifti_header(tmp_path / "app.nii.gz") == nifti_header(nifti)
    original = sitk.ReadImage(str(nifti))
    for geometry in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(reloaded.geometry, geometry)() == getattr(original, geometry)()


# The rest with a stand-in model (conftest's BrightRuntime): fast, and its decode takes no clicks.

@pytest.fixture
def bright_client(bright_runtime):
    with client_for(bright_runtime, name="bright") as client:
        yield client


@pytest.fixture
def small_png(tmp_path):
    pixels = np.zeros((40, 60), np.uint8)
    pixels[10:20, 15:35] = 255
    return grey_png(tmp_path, pixels, "small.png")


def test_a_model_without_clicks_says_so(bright_client, small_png):
    info = bright_client.get("/api/info").json()
    assert info["clicks"] is False and "does not take clicks yet" in info["clicks_note"]
    sid = open_file(bright_client, small_png).json()["session"]
    oid = bright_client.post(f"/api/images/{sid}/objects", json={"box": [10, 5, 40, 25]}).json()["object"]
    refused = bright_client.post(f"/api/images/{sid}/objects/{oid}/clicks", json={"x": 20, "y": 12})
    assert "bright" in error_of(refused, 409) and "does not take clicks yet" in refused.json()["error"]


def test_only_a_decoder_no_click_stage_trained_gets_the_caveat():
    from zoo.app import clicks_note

    class Trained:
        takes_clicks, clicks_trained = True, True

    class Untrained:
        takes_clicks, clicks_trained = True, False

    assert clicks_note(Trained(), "t") == "" and "(u): its decoder was trained on boxes alone" in clicks_note(Untrained(), "u")


def test_bad_files_and_boxes_get_a_clear_message_and_the_server_goes_on(bright_client, small_png, tmp_path):
    root = bright_client.app.state.sessions.root
    (tmp_path / "scan.nii.gz").write_bytes(b"not a nifti at all")
    refused = open_file(bright_client, tmp_path / "scan.nii.gz")
    assert "scan.nii.gz: not a readable nifti image" in error_of(refused, 400)
    (tmp_path / "notes.txt").write_text("hello")
    assert "unsupported file type .txt" in error_of(open_file(bright_client, tmp_path / "notes.txt"), 400)
    good = write_npz(tmp_path / "2DBox_CT_x.npz", imgs=np.zeros((8, 8), np.uint8), boxes=np.array([[1, 1, 5, 5]]))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:40])
    assert "cut.npz: not a readable npz" in error_of(open_file(bright_client, tmp_path / "cut.npz"), 400)
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in error_of(open_file(bright_client, tmp_path / "empty.png"), 400)
    assert list(root.iterdir()) == []  # refused uploads leave nothing behind

    sid = open_file(bright_client, small_png).json()["session"]
    objects = f"/api/images/{sid}/objects"
    problems = {
        "outside the image": {"box": [10, 5, 60, 25]},
        "a box needs x0 < x1": {"box": [40, 5, 10, 25]},
        "spans a single y index": {"box": [1, 5, 9, 5]},  # the one box rule: a one-row box outlines nothing
        "[x0, y0, x1, y1] (a 2D image)": {"box": [1, 1, 0, 5, 5, 0]},
        "unknown modality": {"box": [1, 1, 5, 5], "modality": "Radiology"},
        "slice 3 is outside the image": {"box": [1, 1, 5, 5], "slice": 3},
    }
    for fragment, body in problems.items():
        message = error_of(bright_client.post(objects, json=body), 400)
        assert fragment in message and str(root) not in message
    assert "invalid request" in error_of(bright_client.post(objects, json={"box": ["a", 1, 2, 3]}), 422)
    assert "invalid request" in error_of(bright_client.post(objects, content=b"{not json"), 422)
    assert "no object 7" in error_of(bright_client.post(f"{objects}/7/undo", json={}), 404)
    assert "open it again" in error_of(bright_client.get("/api/images/nope/slices/0"), 404)
    assert "no objects to save" in error_of(bright_client.get(f"/api/images/{sid}/labels"), 409)

    reply = bright_client.post(objects, json={"box": [10, 5, 40, 25]})  # still serving, the session intact
    assert reply.status_code == 200 and reply.json()["objects"][0]["pixels"] == 10 * 20


def test_challenge_npz_and_zipped_dicom_series_open_and_save_in_their_formats(bright_client, val_dir, tmp_path):
    npz = val_dir / PNG_CASE
    opened = open_file(bright_client, npz).json()
    assert opened["file_modality"] == "CT" and opened["labels_name"] == PNG_CASE  # the modality from its name
    box = tight_boxes(np.load(npz)["gts"])[0].tolist()
    bright_client.post(f"/api/images/{opened['session']}/objects", json={"box": box})
    saved = np.load(io.BytesIO(bright_client.get(f"/api/images/{opened['session']}/labels").content))
    assert saved.files == ["segs"] and saved["segs"].dtype == np.uint8
    assert saved["segs"].shape == (opened["height"], opened["width"]) and saved["segs"].max() == 1

    series = write_dicom_series(tmp_path / "series")
    with zipfile.ZipFile(tmp_path / "ct series.zip", "w") as bundle:
        for path in sorted(series.iterdir()):
            bundle.write(path, f"../../{path.name}")  # a traversal attempt: member names are never used
    opened = open_file(bright_client, tmp_path / "ct series.zip").json()
    assert opened["is_3d"] and opened["depth"] == 3 and opened["labels_name"] == "ct series.nii.gz"
    sid = opened["session"]
    bright_client.post(f"/api/images/{sid}/objects", json={"box": [20, 20, 0, 100, 100, 2]})
    (tmp_path / "labels.nii.gz").write_bytes(bright_client.get(f"/api/images/{sid}/labels").content)
    labels, image = read_image(tmp_path / "labels.nii.gz"), read_image(series)
    assert labels.array.shape == image.array.shape and labels.array[1:, 20:101, 20:101].any()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):  # NIfTI stores them as float32
        assert getattr(labels.geometry, get)() == pytest.approx(getattr(image.geometry, get)(), abs=1e-4), get
    assert not (tmp_path.parent / series.name).exists() and not list(tmp_path.parent.glob("*.dcm"))


def test_uploaded_names_are_never_paths_and_no_endpoint_reads_one(bright_client, small_png):
    root = bright_client.app.state.sessions.root
    for name in ("../../../evil.png", "..\\..\\evil.png", "/etc/evil.png"):
        opened = open_file(bright_client, small_png, name=name).json()
        assert opened["name"] == "evil.png"
    stored = [p for p in root.rglob("*") if p.is_file()]
    assert stored and all(p.name == "upload.png" for p in stored)
    assert not (root.parent / "evil.png").exists() and not Path("/etc/evil.png").exists()
    assert display_name("..") == "image" and display_name("a/b/.hidden.nii.gz") == "hidden.nii.gz"
    assert bright_client.get("/static/%2e%2e/app.py").status_code == 404
    assert bright_client.get("/static/..%2fapp.py").status_code == 404
    params = {p for route in bright_client.app.routes for p in getattr(route, "param_convertors", {})}
    assert params <= {"sid", "z", "oid", "path"}  # 'path': the static files' own, inside zoo/app_static only


def test_oversized_uploads_are_refused(bright_runtime, small_png, tmp_path):
    assert len(small_png.read_bytes()) > 64
    with client_for(bright_runtime, max_upload_bytes=64) as client:
        root = client.app.state.sessions.root
        assert "--max-upload-mb" in error_of(open_file(client, small_png), 413)
        chunks = (small_png.read_bytes()[i : i + 50] for i in range(0, 400, 50))  # no Content-Length: counted
        refused = client.post("/api/images", params={"name": "streamed.png"}, content=chunks)
        assert "--max-upload-mb" in error_of(refused, 413)
        assert list(root.iterdir()) == []
    with client_for(bright_runtime, max_upload_bytes=4096) as client:
        with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as bundle:
            bundle.writestr("a.dcm", b"\0" * 100_000)  # 100 kB unpacked from a few hundred bytes
        assert "unpacks to" in error_of(open_file(client, tmp_path / "bomb.zip"), 413)


def test_sessions_are_separate_and_their_folder_goes_at_exit(bright_runtime, small_png):
    with client_for(bright_runtime, max_sessions=2) as client:
        root = client.app.state.sessions.root
        assert root.is_dir()
        first, second = (open_file(client, small_png).json()["session"] for _ in range(2))
        assert first != second
        assert client.get(f"/api/images/{second}/labels/0").content == bytes(40 * 60 * 2)  # nothing there yet
        client.post(f"/api/images/{first}/objects", json={"box": [10, 5, 40, 25]})  # first: the last used
        assert client.get(f"/api/images/{second}/labels/0").content == bytes(40 * 60 * 2)  # still nothing
        client.get(f"/api/images/{first}/slices/0")
        open_file(client, small_png)  # a third: the least recently used (second) is closed
        assert "open it again" in error_of(client.get(f"/api/images/{second}/slices/0"), 404)
        assert client.get(f"/api/images/{first}/slices/0").status_code == 200
        assert client.get(f"/api/images/{first}/progress").json() == {"done": 0, "total": 0}  # nothing running
        client.delete(f"/api/images/{first}")
        assert len(list(root.iterdir())) == 1
    assert not root.exists()


def test_other_sites_are_refused(bright_runtime, small_png):
    with client_for(bright_runtime) as client:
        no_header = client.post("/api/images", params={"name": "a.png"}, content=small_png.read_bytes(),
                                headers={"X-Requested-With": ""})
        assert "x-requested-with" in error_of(no_header, 403)
        assert client.get("/api/info", headers={"Host": "attacker.example"}).status_code == 400
        page = client.get("/")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        for asset in ("/static/app.js", "/static/app.css"):
            assert client.get(asset).status_code == 200


def test_command_defaults_and_the_warning_off_this_machine():
    args = parse_args([])
    assert (args.model, args.host, args.port, args.max_upload_mb, args.open) == ("auto", "127.0.0.1",
                                                                                  8000, 1024.0, False)
    assert all(host_warning(host) is None for host in ("127.0.0.1", "localhost", "::1"))
    assert "no login" in host_warning("0.0.0.0")


def test_a_code_running_checkpoint_is_refused_before_serving(tmp_path, capsys, monkeypatch):
    import uvicorn

    from tests.helpers import write_malicious_checkpoint
    from zoo.app import main

    marker = tmp_path / "code_ran"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("served a refused model"))
    assert main(["--model", str(evil), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "no login" in err and "evil.pt: refused: it would run code when loaded" in err
    assert not marker.exists()


def test_a_click_on_a_sparse_object_refines_on_its_focus_crop_as_zoo_interactive_does(fast_model, val_dir):
    from zoo.data.io import load_case
    from zoo.interactive import Refinement

    npz = val_dir / "2DBox_Fundus_DRIVE_08.npz"  # a vessel tree: its mask covers a small share of its box
    case = load_case(npz)
    reference = Refinement(fast_model, case)
    box = case.boxes[0].tolist()
    with client_for(fast_model) as client:
        sid = open_file(client, npz).json()["session"]
        oid = client.post(f"/api/images/{sid}/objects", json={"box": box, "modality": "Fundus"}).json()["objects"][0]["id"]
        for _ in range(2):  # the protocol's clicks, given to the app by hand
            before = reference.crop_embeddings
            click = reference.simulate(case.gts == 1)[0]
            assert reference.crop_embeddings == before + 1  # a focus crop around the click, embedded
            assert reference.objects[0].slices[None].frame is None  # a focus answer is the whole frame's
            y, x = click.position
            answer = client.post(f"/api/images/{sid}/objects/{oid}/clicks",
                                 json={"x": x, "y": y, "positive": click.positive}).json()
            assert answer["encoder_runs"] == 1
            assert np.array_equal(labels_of(answer, case.gts.shape) == oid, reference.segs == 1)  # the same decode


def test_a_click_on_a_small_object_zooms_as_zoo_interactive_does(fast_model, tmp_path):
    from zoo.data.io import Case
    from zoo.interactive import Refinement

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 40, (512, 512), dtype=np.uint8)
    pixels[240:262, 300:318] = 180  # a small object: 11 x 9 px at the whole image's 256 frame
    png = grey_png(tmp_path, pixels)
    box = [298, 238, 319, 263]
    reference = Refinement(fast_model, Case(path=None, image=np.stack([pixels] * 3, -1), boxes=np.array([box]),
                                            gts=None, spacing=np.ones(2), modality="CT"))
    with client_for(fast_model) as client:
        sid = open_file(client, png).json()["session"]
        oid = client.post(f"/api/images/{sid}/objects", json={"box": box, "modality": "CT"}).json()["objects"][0]["id"]
        first = client.post(f"/api/images/{sid}/objects/{oid}/clicks", json={"x": 309, "y": 250, "positive": True}).json()
        assert first["encoder_runs"] == 1  # the zoom crop, embedded once
        reference.click(0, (250, 309), positive=True)
        assert np.array_equal(labels_of(first, pixels.shape) == oid, reference.segs == 1)  # the same decode
        second = client.post(f"/api/images/{sid}/objects/{oid}/clicks", json={"x": 301, "y": 259, "positive": False}).json()
        assert second["encoder_runs"] == 0  # the same crop: the decoder alone
        reference.click(0, (259, 301), positive=False)
        assert np.array_equal(labels_of(second, pixels.shape) == oid, reference.segs == 1)
        undone = client.post(f"/api/images/{sid}/objects/{oid}/undo", json={}).json()
        assert np.array_equal(labels_of(undone, pixels.shape), labels_of(first, pixels.shape))
