"""benchmarks.run --clicks and benchmarks.evaluate --clicks: the interactive protocol on every case, its per-step
scores and AUCs in cases.csv, the leaderboard and the curves, and the same scores from the saved steps."""

import numpy as np
import pytest

from benchmarks import clicks
from benchmarks.evaluate import main as evaluate
from benchmarks.run import LEADERBOARD_FIELDS, main
from tests.benchmarks.test_run import tiny_data  # noqa: F401  (a fixture)
from tests.helpers import tiny_model, write_npz
from zoo.data.io import read_csv
from zoo.interactive import interaction_auc
from zoo.models.checkpoint import save_checkpoint


def test_run_with_clicks_scores_every_step_and_the_box_step_is_the_box_only_board(tiny_data, tmp_path, capsys):  # noqa: F811
    model_path = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    common = ["--data", str(tiny_data), "--models", str(model_path), "--all", "--no-latency", "--cache-dir", str(tmp_path / "cache")]
    assert main([*common, "--out", str(tmp_path / "boxes")]) == 1  # 2DBox_US_bad.npz has no gts: named, skipped
    assert main([*common, "--out", str(tmp_path / "out"), "--clicks", "2", "--save-segs", str(tmp_path / "segs")]) == 1
    assert "interactive protocol, box + 2 clicks" in capsys.readouterr().out
    cases = {c["case"]: c for c in read_csv(tmp_path / "out" / "cases.csv")}
    boxes = {c["case"]: c for c in read_csv(tmp_path / "boxes" / "cases.csv")}
    assert set(cases) == {"2DBox_US_one.npz", "3DBox_CT_two.npz"}
    for name, case in cases.items():
        assert (case["dsc"], case["nsd"]) == (boxes[name]["dsc"], boxes[name]["nsd"])  # step 0 is the box-only result
        dscs = [float(case["dsc"])] + [float(case[f"dsc_{k}"]) for k in (1, 2)]
        assert float(case["dsc_auc"]) == pytest.approx(interaction_auc(dscs, 2), abs=1e-4)
        assert float(case["click_seconds"]) >= 0
    (row,) = read_csv(tmp_path / "out" / "leaderboard.csv")
    assert list(row) == LEADERBOARD_FIELDS + clicks.leaderboard_fields() and row["clicks"] == "2"
    assert row["click_ms"] == ""  # --no-latency
    assert float(row["dsc_clicks_US"]) == pytest.approx(float(cases["2DBox_US_one.npz"]["dsc_2"]), abs=1e-4)
    gain = np.mean([float(cases[n]["dsc_2"]) - float(cases[n]["dsc"]) for n in cases])  # one case per modality
    assert float(row["dsc_clicks_gain"]) == pytest.approx(gain, abs=2e-4)
    curves = read_csv(tmp_path / "out" / "clicks.csv")
    assert [(c["modality"], c["step"]) for c in curves if c["modality"] == "CT"] == [("CT", "0"), ("CT", "1"), ("CT", "2")]
    assert (tmp_path / "out" / "clicks.png").stat().st_size > 0
    saved = np.load(tmp_path / "segs" / "tiny" / "3DBox_CT_two.npz")
    assert saved["all_segs"].shape == (3, 6, 32, 32) and np.array_equal(saved["segs"], saved["all_segs"][-1])

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
