"""benchmarks.run --clicks and benchmarks.evaluate --clicks: the interactive protocol on every case, its per-step
scores and AUCs in cases.csv, the leaderboard and the curves, and the same scores from the saved steps."""

from concurrent.futures import Future
from dataclasses import replace

import numpy as np
import pytest
import torch

import benchmarks.run
from benchmarks import clicks
from benchmarks.evaluate import main as evaluate
from benchmarks.run import LEADERBOARD_FIELDS, main
from tests.helpers import TINY, write_npz
from zoo.data.io import load_case, read_csv
from zoo.data.scoring import case_scores
from zoo.index import load
from zoo.interactive import interaction_auc
from zoo.models.checkpoint import save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM
from zoo.predict import ModalityChoice, segment_case
from zoo.runtime.embedding_cache import CachedEncoder


class InProcess:
    """benchmarks.run's per-variant process pool, run in this process: a spawned child costs its imports (10 s and
    more on 2 busy cores) each time; the child isolation itself is tested in tests/benchmarks/test_run.py."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        future = Future()
        future.set_result(fn(*args))
        return future


@pytest.fixture
def in_process(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(benchmarks.run, "ProcessPoolExecutor", InProcess)
    yield
    torch.set_num_threads(threads)  # a variant sets its --threads


@pytest.fixture
def tiny_data(tmp_path):
    """A 2D case, a 3D case of 4 slices (2 in the box: each slice costs an embedding and decodes) and one without gts."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    gts = np.zeros((40, 48), np.uint8)
    gts[8:24, 12:36] = 1
    write_npz(data / "2DBox_US_one.npz", imgs=image, gts=gts, boxes=np.array([[12, 8, 35, 23]]), spacing=np.ones(2))
    volume = rng.integers(0, 255, (4, 24, 24), dtype=np.uint8)
    gts3 = np.zeros_like(volume)
    gts3[1:3, 6:16, 6:16] = 1
    write_npz(data / "3DBox_CT_two.npz", imgs=volume, gts=gts3, boxes=np.array([[6, 6, 1, 15, 15, 2]]),
              spacing=np.array([2.0, 1.0, 1.0]))
    write_npz(data / "2DBox_US_bad.npz", imgs=image, boxes=np.array([[12, 8, 35, 23]]))  # no gts
    return data


def test_run_with_clicks_scores_every_step_and_the_box_step_is_the_box_only_board(tiny_data, tmp_path, capsys,
                                                                                   in_process):
    torch.manual_seed(0)  # the tiny model with the light decoder, as the click champion has (and quicker to decode)
    tiny = ClassPromptSAM(replace(TINY, decoder_token_stride=4)).eval()
    torch.nn.init.normal_(tiny.class_prompt.weight)
    model_path = save_checkpoint(tmp_path / "tiny.pt", tiny)
    common = ["--data", str(tiny_data), "--models", str(model_path), "--all", "--no-latency", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "out"), "--clicks", "2", "--save-segs", str(tmp_path / "segs")]) == 1
    assert "interactive protocol, box + 2 clicks" in capsys.readouterr().out  # 2DBox_US_bad.npz (no gts): skipped
    cases = {c["case"]: c for c in read_csv(tmp_path / "out" / "cases.csv")}
    assert set(cases) == {"2DBox_US_one.npz", "3DBox_CT_two.npz"}
    model = CachedEncoder(load(str(model_path)), tmp_path / "cache")  # the run's embeddings
    for name, case in cases.items():
        box_only = load_case(tiny_data / name)  # step 0 is the box-only result, as a box-only board scores it
        scores = case_scores(box_only.gts, segment_case(model, box_only, ModalityChoice(model)).segs,
                             box_only.spacing.tolist())
        assert (case["dsc"], case["nsd"]) == tuple(f"{score:.4f}" for score in scores)
        dscs = [float(case["dsc"])] + [float(case[f"dsc_{k}"]) for k in (1, 2)]
        assert float(case["dsc_auc"]) == pytest.approx(interaction_auc(dscs, 2), abs=1e-4)
        # objects too large to zoom on: a crop is a sparse mask's focus crop, at most one a click
        assert float(case["click_seconds"]) >= 0 and 0 <= int(case["crop_embeddings"]) <= 2
    (row,) = read_csv(tmp_path / "out" / "leaderboard.csv")
    assert list(row) == LEADERBOARD_FIELDS + clicks.leaderboard_fields() and row["clicks"] == "2"
    assert row["click_ms"] == "" and row["click_zoom"] == "yes"  # --no-latency; zoom is on unless --no-zoom
    assert float(row["dsc_clicks_US"]) == pytest.approx(float(cases["2DBox_US_one.npz"]["dsc_2"]), abs=1e-4)
    gain = np.mean([float(cases[n]["dsc_2"]) - float(cases[n]["dsc"]) for n in cases])  # one case per modality
    assert float(row["dsc_clicks_gain"]) == pytest.approx(gain, abs=2e-4)
    curves = read_csv(tmp_path / "out" / "clicks.csv")
    assert [(c["modality"], c["step"]) for c in curves if c["modality"] == "CT"] == [("CT", "0"), ("CT", "1"), ("CT", "2")]
    assert (tmp_path / "out" / "clicks.png").stat().st_size > 0
    saved = np.load(tmp_path / "segs" / "tiny" / "3DBox_CT_two.npz")
    assert saved["all_segs"].shape == (3, 4, 24, 24) and np.array_equal(saved["segs"], saved["all_segs"][-1])

    # the same scores from the saved steps
    assert evaluate(["--segs", str(tmp_path / "segs" / "tiny"), "--gts", str(tiny_data), "--out", str(tmp_path / "m.csv"),
                     "--clicks", "2", "--skip-missing"]) == 0
    scored = {r["case"]: r for r in read_csv(tmp_path / "m.csv")}
    for name, case in cases.items():
        for key in ("dsc", "nsd", "dsc_1", "dsc_2", "nsd_2", "dsc_auc", "nsd_auc"):
            assert float(scored[name][key]) == pytest.approx(float(case[key]), abs=1e-4), (name, key)
    summary = {r["group"]: r for r in read_csv(tmp_path / "m_summary.csv")}
    assert "dsc_auc" in summary["mean over modalities"]


def test_evaluate_refuses_steps_that_do_not_match_and_scores_a_missing_case_zero_at_every_step(tmp_path, capsys):
    segs, gts = tmp_path / "segs", tmp_path / "gts"
    segs.mkdir(), gts.mkdir()
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    for name in ("2DBox_US_a.npz", "2DBox_US_b.npz", "2DBox_US_c.npz"):
        write_npz(gts / name, gts=mask)
    write_npz(segs / "2DBox_US_a.npz", segs=mask, all_segs=np.stack([np.zeros_like(mask), mask, mask]))
    write_npz(segs / "2DBox_US_b.npz", segs=mask, all_segs=np.stack([mask, mask]))  # one step short
    assert evaluate(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv"), "--clicks", "2"]) == 1
    assert "all_segs holds 2 steps; --clicks 2 needs 3" in capsys.readouterr().err
    rows = {r["case"]: r for r in read_csv(tmp_path / "m.csv")}
    assert rows["2DBox_US_a.npz"]["dsc"] == "0.0000" and rows["2DBox_US_a.npz"]["dsc_2"] == "1.0000"
    assert rows["2DBox_US_a.npz"]["dsc_auc"] == "1.0000"  # the trapezoid under the 2 click steps, both 1
    assert rows["2DBox_US_c.npz"]["status"] == "missing" and rows["2DBox_US_c.npz"]["dsc_auc"] == "0.0000"


def test_curves_are_means_per_modality_then_over_modalities():
    cases = [{"model": "m", "modality": "US", "dsc": 0.2, "nsd": 0.1, "dsc_1": 0.6, "nsd_1": 0.5},
             {"model": "m", "modality": "US", "dsc": 0.4, "nsd": 0.3, "dsc_1": 0.8, "nsd_1": 0.7},
             {"model": "m", "modality": "CT", "dsc": 1.0, "nsd": 1.0, "dsc_1": 1.0, "nsd_1": 1.0}]
    table = {(r["modality"], r["step"]): r for r in clicks.curves(cases, 1)}
    assert table[("US", 1)]["dsc"] == pytest.approx(0.7) and table[("US", 0)]["cases"] == 2
    assert table[("mean over modalities", 1)]["dsc"] == pytest.approx((0.7 + 1.0) / 2)
    assert clicks.clicks_of(cases) == 1


@pytest.mark.parametrize(("extra", "message"), [(["--clicks", "-1"], "--clicks must be 0 or more"),
                                                (["--clicks", "2", "--case-times"], "--clicks and --case-times"),
                                                (["--no-zoom"], "--no-zoom is about clicks")])
def test_clicks_are_checked_and_not_combined_with_case_times(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmarks.run.parse_args(extra)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
