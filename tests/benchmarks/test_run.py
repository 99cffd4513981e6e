import re

import numpy as np
import pytest

from benchmarks.run import LEADERBOARD_FIELDS, compare_with_parents, main, merge_previous, select_cases, variant_label
from tests.helpers import assert_refused, tiny_model, write_npz
from zoo.data.io import read_csv, write_csv_atomic
from zoo.models.checkpoint import save_checkpoint
from zoo.runtime.cpu import cpu_flags, cpu_model


@pytest.fixture
def tiny_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
    gts = np.zeros((64, 80), np.uint8)
    gts[10:30, 20:50] = 1
    write_npz(data / "2DBox_US_one.npz", imgs=image, gts=gts, boxes=np.array([[20, 10, 49, 29]]), spacing=np.ones(2))
    volume = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    gts3 = np.zeros_like(volume)
    gts3[1:5, 8:20, 8:20] = 1
    write_npz(data / "3DBox_CT_two.npz", imgs=volume, gts=gts3, boxes=np.array([[8, 8, 1, 19, 19, 4]]),
              spacing=np.array([2.0, 1.0, 1.0]))
    write_npz(data / "2DBox_US_bad.npz", imgs=image, boxes=np.array([[20, 10, 49, 29]]))  # no gts
    return data


def test_run_writes_leaderboard_cases_and_plots_and_survives_a_broken_variant(tiny_data, tmp_path, capsys):
    model_path = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"garbage")
    out = tmp_path / "out"
    blocked = tmp_path / "segs" / "tiny" / "2DBox_US_one.npz"
    blocked.mkdir(parents=True)  # an output that cannot be replaced: named, and the case still scored
    code = main(["--data", str(tiny_data), "--models", f"{broken},{model_path}", "--out", str(out), "--all",
                 "--save-segs", str(tmp_path / "segs"), "--cache-dir", str(tmp_path / "cache"), "--latency-budget", "1"])
    assert code == 1
    printed = capsys.readouterr()
    err = printed.err
    assert f"leaderboard: {out / 'leaderboard.csv'}" in printed.out and "tiny " in printed.out
    assert "variant" in err and "broken.pt" in err and "2DBox_US_bad.npz: no 'gts'" in err
    assert f"error: {blocked}: cannot be written" in err
    cases = read_csv(out / "cases.csv")
    assert sorted(c["case"] for c in cases) == ["2DBox_US_one.npz", "3DBox_CT_two.npz"]
    assert all(0 <= float(c["dsc"]) <= 1 and float(c["seconds"]) > 0 for c in cases)
    (row,) = read_csv(out / "leaderboard.csv")
    assert list(row) == LEADERBOARD_FIELDS
    assert row["model"] == "tiny" and row["backend"] == "pytorch" and row["precision"] == "fp32"
    assert float(row["encoder_GFLOPs"]) > 0 and float(row["latency_2d_ms"]) > 0 and float(row["latency_3d_s"]) > 0
    assert float(row["params_vs_reference"]) == pytest.approx(float(row["params_M"]) / 10.99, abs=1e-3)
    assert row["dsc_US"] != "" and row["dsc_Fundus"] == ""
    assert row["cpu"] == cpu_model() and row["cpu_flags"] == " ".join(cpu_flags())  # what the timings were measured on
    assert (out / "radar.png").stat().st_size > 0 and (out / "latency_vs_dsc.png").stat().st_size > 0
    assert (tmp_path / "segs" / "tiny" / "3DBox_CT_two.npz").exists()
    assert float(row["head_accuracy"]) in (0.0, 0.5, 1.0) and (out / "confusion_tiny.png").stat().st_size > 0


def test_sample_is_seeded_and_per_modality(tmp_path):
    for modality in ("US", "CT"):
        for i in range(5):
            (tmp_path / f"2DBox_{modality}_{i}.npz").touch()
    first = select_cases(tmp_path, 2, seed=0)
    assert first == select_cases(tmp_path, 2, seed=0)
    assert sum("_US_" in p.name for p in first) == 2 and len(first) == 4
    assert len(select_cases(tmp_path, None)) == 10


def test_a_sample_covers_2d_and_3d_and_draws_volumes_with_few_slices(tmp_path):
    volume = np.zeros((40, 8, 8), np.uint8)
    for i, slices in enumerate((30, 3, 12, 25, 40, 5, 20, 35)):  # the quarter with the fewest: 3 and 5 slices
        write_npz(tmp_path / f"3DBox_MR_{i}.npz", imgs=volume, boxes=np.array([[1, 1, 0, 6, 6, slices - 1]]))
    write_npz(tmp_path / "3DBox_CT_big.npz", imgs=volume, boxes=np.array([[1, 1, 0, 6, 6, 39]]))
    for i in range(3):
        (tmp_path / f"2DBox_CT_{i}.npz").touch()
    draws = {seed: select_cases(tmp_path, 1, seed) for seed in range(12)}
    assert {p.name for d in draws.values() for p in d if "_MR_" in p.name} == {"3DBox_MR_1.npz", "3DBox_MR_5.npz"}
    assert all(len(d) == 2 for d in draws.values())
    assert {p.name for p in select_cases(tmp_path, 4, 0)} >= {"3DBox_CT_big.npz", "2DBox_CT_0.npz"}  # CT: 2D and 3D
    assert len(select_cases(tmp_path, None)) == 12
    anywhere = {p.name for seed in range(12) for p in select_cases(tmp_path, 1, seed, small_volumes=False) if "_MR_" in p.name}
    assert len(anywhere) > 2  # --volumes any: the earlier sample, from every volume



def test_no_output_is_an_input_and_threads_are_checked(tiny_data, tmp_path, capsys):
    model_path = save_checkpoint(tmp_path / "data.pt", tiny_model())  # its segs would go to SEGS/data/
    before = {p.name: p.read_bytes() for p in tiny_data.iterdir()}
    common = ["--data", str(tiny_data), "--models", str(model_path), "--all", "--cache-dir", str(tmp_path / "cache")]
    assert main(common + ["--out", str(tiny_data)]) == 2  # run_cli: one line, exit 2
    assert "--out is the input" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "out"), "--save-segs", str(tmp_path)]) == 2
    assert "--save-segs is the input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tiny_data.iterdir()} == before and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--threads", "-1"])
    assert exit_info.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--out", str(tmp_path / "out"), "--cache-max-gb", "0"])
    assert exit_info.value.code == 2 and "--cache-max-gb must be positive" in capsys.readouterr().err


@pytest.mark.slow  # two boards (30 s); tests/zoo/runtime/test_embedding_cache.py checks damaged entries in CI
def test_a_damaged_embedding_cache_gives_a_clean_runs_scores(tiny_data, tmp_path, capfd):
    """Issue #18's report: 1 MiB flipped in cached embeddings, sizes kept; each entry is named once and recomputed."""
    from tests.helpers import flip_bytes

    (tiny_data / "2DBox_US_bad.npz").unlink()
    model_path = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    common = ["--data", str(tiny_data), "--models", str(model_path), "--all", "--threads", "1",
              "--cache-dir", str(tmp_path / "cache"), "--no-latency"]
    assert main(common + ["--out", str(tmp_path / "clean")]) == 0
    entries = sorted((tmp_path / "cache").rglob("*.emb"))
    assert entries
    for entry in entries:
        flip_bytes(entry)
    capfd.readouterr()
    assert main(common + ["--out", str(tmp_path / "again")]) == 0
    # (a child's progress bar may share a line with the warning: the path is read from "warning: PATH: damaged")
    named = re.findall(r"warning: (\S+): damaged embedding-cache entry", capfd.readouterr().err)
    assert sorted(named) == list(map(str, entries))
    scores = [[(c["case"], c["dsc"], c["nsd"]) for c in read_csv(tmp_path / out / "cases.csv")]
              for out in ("clean", "again")]
    assert scores[0] == scores[1]


def test_bad_input_corpus(tmp_path, capsys):
    from tests.helpers import assert_reported, write_corpus

    bad, good = write_corpus(tmp_path / "data", many_boxes=False)  # (300 boxes: tests/zoo/test_predict.py)
    model_path = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    out = tmp_path / "out"
    code = main(["--data", str(tmp_path / "data"), "--models", str(model_path), "--out", str(out), "--all",
                 "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--no-latency"])
    assert code == 1
    assert_reported(capsys.readouterr().err, bad)
    assert sorted(c["case"] for c in read_csv(out / "cases.csv")) == sorted(good)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_merge_adds_and_replaces_rows_of_the_same_cases(tiny_data, tmp_path, capsys):
    (tiny_data / "2DBox_US_bad.npz").unlink()
    first = save_checkpoint(tmp_path / "first.pt", tiny_model(0))
    second = save_checkpoint(tmp_path / "second.pt", tiny_model(1), {"parent": str(first)})  # as compress.prune records it
    out = tmp_path / "out"
    # (a short latency budget: the test is about the rows, but encoder_speedup_vs_parent needs timings)
    common = ["--data", str(tiny_data), "--out", str(out), "--all", "--cache-dir", str(tmp_path / "cache"),
              "--latency-budget", "1"]
    assert main(common + ["--models", str(first)]) == 0
    older = [{k: v for k, v in r.items() if k not in ("cpu", "cpu_flags")} for r in read_csv(out / "leaderboard.csv")]
    # as written before the CPU columns were added
    write_csv_atomic(out / "leaderboard.csv", older, [k for k in LEADERBOARD_FIELDS if k not in ("cpu", "cpu_flags")])
    assert main(common + ["--models", str(second), "--merge"]) == 0
    rows = read_csv(out / "leaderboard.csv")
    assert [r["model"] for r in rows] == ["first", "second"]
    assert list(rows[0]) == LEADERBOARD_FIELDS and rows[0]["cpu"] == "" and rows[1]["cpu"] == cpu_model()
    assert rows[0]["parent"] == "" and rows[1]["parent"] == "first"
    assert rows[0]["cases"] == rows[1]["cases"] == "2"  # a count read back and written again stays a count
    change = float(rows[1]["dsc_mean_modalities"]) - float(rows[0]["dsc_mean_modalities"])
    assert float(rows[1]["dsc_vs_parent"]) == pytest.approx(change, abs=2e-4)
    assert rows[1]["encoder_speedup_vs_parent"] == ""  # timed in another run than its parent
    again = {"model": "first", "dsc_mean_modalities": 0.5}  # benchmarked again: its row and cases are replaced
    merged_cases, merged_rows = merge_previous(out, [{"case": "2DBox_US_one.npz", "model": "first"}], [again])
    assert [r["model"] for r in merged_rows] == ["second", "first"] and merged_rows[1] is again
    assert sorted(c["model"] for c in merged_cases) == ["first", "second", "second"]
    cases = read_csv(out / "cases.csv")
    assert sorted((c["model"], c["case"]) for c in cases) == [(m, c) for m in ("first", "second")
                                                              for c in ("2DBox_US_one.npz", "3DBox_CT_two.npz")]
    other = tmp_path / "other"
    other.mkdir()
    (tiny_data / "2DBox_US_one.npz").rename(other / "2DBox_US_one.npz")
    code = main(["--data", str(other), "--out", str(out), "--all", "--models", str(first), "--merge"])
    assert_refused(code, capsys, "other cases")


def test_variants_are_compared_with_their_parent_on_the_same_leaderboard():
    rows = [{"model": "parent", "parent": "", "encoder_ms": 900.0, "dsc_mean_modalities": 0.70, "nsd_mean_modalities": 0.60},
            {"model": "int8", "parent": "parent", "encoder_ms": 300.0, "dsc_mean_modalities": 0.69, "nsd_mean_modalities": 0.62},
            {"model": "orphan", "parent": "elsewhere", "encoder_ms": 100.0, "dsc_mean_modalities": 0.5, "nsd_mean_modalities": 0.5}]
    compare_with_parents(rows, timed_together={"parent", "int8", "orphan"})
    assert rows[1]["dsc_vs_parent"] == pytest.approx(-0.01) and rows[1]["nsd_vs_parent"] == pytest.approx(0.02)
    assert rows[1]["encoder_speedup_vs_parent"] == pytest.approx(3.0)
    assert "dsc_vs_parent" not in rows[0] and "dsc_vs_parent" not in rows[2]


def test_labels_name_checkpoints_by_stem_and_keep_a_replaced_parents_hash():
    assert variant_label("cp_tinyvit") == "cp_tinyvit" and variant_label("runs/x/best.pt") == "best"
    assert variant_label("runs/compress/q/manifest.json") == "q"
    assert variant_label("zoo/cp_tinyvit.pt@66cf2737") == "cp_tinyvit@66cf2737"


def test_models_default_to_the_zoos_benchmark_set_and_all_to_every_variant_this_cpu_runs(tmp_path, monkeypatch, capsys):
    import json

    import zoo.index
    import zoo.runtime.cpu
    from benchmarks.run import chosen_models

    index = tmp_path / "index.json"
    entries = [{"name": "litemedsam", "default_benchmark": True}, {"name": "a", "precision": "fp32", "default_benchmark": True},
               {"name": "a_p50", "precision": "fp32"}, {"name": "a_bf16", "backend": "openvino", "precision": "bf16", "default_benchmark": True}]
    index.write_text(json.dumps({"models": entries}))
    monkeypatch.setattr(zoo.index, "INDEX_PATH", index)
    monkeypatch.setattr(zoo.runtime.cpu, "openvino_supports_bf16", lambda: False)
    assert chosen_models(None) == ["litemedsam", "a"]
    assert chosen_models("all") == ["litemedsam", "a", "a_p50"]
    assert capsys.readouterr().out.count("not benchmarked: a_bf16: a bf16 variant; this CPU") == 2
    assert chosen_models("a_bf16, x.pt") == ["a_bf16", "x.pt"]  # asked for by name: tried, and reported if it fails
    monkeypatch.setattr(zoo.runtime.cpu, "openvino_supports_bf16", lambda: True)
    assert chosen_models(None) == ["litemedsam", "a", "a_bf16"]


# Three small val images of the shipped board (benchmarks/cases.csv), re-segmented by the shipped files.
RECORDED_CASES = ["2DBox_CT_SAMMed2DTotalSeg_s0114-111.npz", "2DBox_Microscopy_DSB2018_1d5f4717e179a036.npz",
                  "2DBox_US_DDTI_133_1-1.npz"]


@pytest.mark.parametrize("model, tolerance", [
    ("cp_tinyvit_fast", 0.005),
    pytest.param("cp_tinyvit_fast_openvino_int8", 0.05, marks=pytest.mark.slow)])  # exports its parent first
def test_shipped_fast_models_reproduce_their_recorded_val_scores(val_dir, model, tolerance):
    """A loaded zoo file gives the scores the shipped leaderboard recorded for it (FP32 within rounding across CPUs;
    INT8 kernels differ more between CPUs with and without VNNI)."""
    from pathlib import Path

    import zoo.index
    from zoo.data.io import load_case
    from zoo.data.scoring import case_scores
    from zoo.predict import ModalityChoice, segment_case

    board = Path(__file__).resolve().parents[2] / "benchmarks" / "cases.csv"
    recorded = {c["case"]: c for c in read_csv(board) if c["model"] == model}
    loaded = zoo.index.load(model)
    for name in RECORDED_CASES:
        case = load_case(val_dir / name)
        dsc, nsd = case_scores(case.gts, segment_case(loaded, case, ModalityChoice(loaded)).segs, case.spacing.tolist())
        assert dsc == pytest.approx(float(recorded[name]["dsc"]), abs=tolerance), name
        assert nsd == pytest.approx(float(recorded[name]["nsd"]), abs=tolerance), name


def test_speedups_compare_only_with_baselines_timed_in_the_same_run():
    from benchmarks.run import compare_with_baselines

    rows = [{"model": "litemedsam", "latency_2d_ms": 1400.0}, {"model": "litemedsam_openvino", "latency_2d_ms": 600.0},
            {"model": "fast", "latency_2d_ms": 35.0}, {"model": "old", "latency_2d_ms": 50.0}]
    compare_with_baselines(rows, {"litemedsam", "litemedsam_openvino", "fast"})
    fast = rows[2]
    assert fast["speedup_vs_litemedsam"] == pytest.approx(40.0) and fast["speedup_vs_litemedsam_openvino"] == pytest.approx(600 / 35)
    assert "speedup_vs_litemedsam" not in rows[3]  # a row of an earlier run keeps what it had
    compare_with_baselines(rows, {"fast"})  # the baselines were not timed in this run
    assert fast["speedup_vs_litemedsam"] == "" and fast["speedup_vs_litemedsam_openvino"] == ""


def test_case_times_are_whole_cases_without_the_cache(tiny_data, tmp_path):
    from benchmarks.run import case_time_rows

    model_path = save_checkpoint(tmp_path / "tiny.pt", tiny_model())
    out = tmp_path / "out"
    assert main(["--data", str(tiny_data), "--models", f"tiny={model_path}", "--out", str(out), "--all", "--case-times",
                 "--cache-dir", str(tmp_path / "cache"), "--latency-budget", "2"]) == 1  # the case without gts
    assert not (tmp_path / "cache").exists()  # no embedding cache: every case is computed
    (row,) = read_csv(out / "leaderboard.csv")
    times = read_csv(out / "case_times.csv")
    assert {t["modality"] for t in times} == {"US", "CT"} and all(t["model"] == "tiny" for t in times)
    assert float(row["wall_case_max_s"]) >= float(row["wall_case_median_s"]) > 0
    assert row["slowest_case"] in {"2DBox_US_one.npz", "3DBox_CT_two.npz"}
    assert float(row["first_call_2d_ms"]) > 0 and float(row["load_s"]) > 0 and row["latency_stable"] in ("True", "False")
    cases = [{"model": "m", "modality": "CT", "case": f"c{i}", "seconds": s} for i, s in enumerate((1.0, 3.0, 2.0))]
    assert case_time_rows(cases) == [{"model": "m", "modality": "CT", "cases": 3, "median_s": 2.0, "max_s": 3.0,
                                      "slowest_case": "c1"}]
