
import numpy as np
import pytest

from benchmarks.evaluate import main, summarize
from tests.helpers import write_npz
from zoo.data.io import read_csv


def test_scores_directories_and_summarizes_by_modality(tmp_path, capsys):
    segs, gts = tmp_path / "segs", tmp_path / "gts"
    segs.mkdir(), gts.mkdir()
    mask = np.zeros((30, 30), np.uint8)
    mask[5:15, 5:15] = 1
    for name, pred in [("2DBox_US_a.npz", mask), ("2DBox_US_b.npz", np.zeros_like(mask)), ("2DBox_CT_c.npz", mask)]:
        write_npz(gts / name, gts=mask, spacing=np.ones(2))
        write_npz(segs / name, segs=pred)
    write_npz(segs / "2DBox_CT_orphan.npz", segs=mask)  # no ground truth: reported, not scored
    code = main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv")])
    assert code == 1
    assert "2DBox_CT_orphan.npz: file does not exist" in capsys.readouterr().err
    rows = read_csv(tmp_path / "m.csv")
    assert [(r["case"], r["dsc"]) for r in rows] == [("2DBox_CT_c.npz", "1.0000"), ("2DBox_US_a.npz", "1.0000"),
                                                      ("2DBox_US_b.npz", "0.0000")]
    summary = {r["group"]: r for r in read_csv(tmp_path / "m_summary.csv")}
    assert summary["US"]["dsc"] == "0.5000" and summary["CT"]["dsc"] == "1.0000"
    assert summary["mean over modalities"]["dsc"] == "0.7500"
    assert summary["mean over cases"]["dsc"] == "0.6667"


def test_shape_mismatch_and_missing_key_are_reported(tmp_path, capsys):
    segs, gts = tmp_path / "segs", tmp_path / "gts"
    segs.mkdir(), gts.mkdir()
    write_npz(gts / "2DBox_US_a.npz", gts=np.ones((4, 4), np.uint8))
    write_npz(segs / "2DBox_US_a.npz", segs=np.ones((5, 4), np.uint8))
    write_npz(gts / "2DBox_US_b.npz", gts=np.ones((4, 4), np.uint8))
    write_npz(segs / "2DBox_US_b.npz", mask=np.ones((4, 4), np.uint8))
    assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv")]) == 1
    err = capsys.readouterr().err
    assert "does not match gts shape" in err and "missing key 'segs'" in err


def test_summary_means():
    rows = [{"modality": "US", "dsc": 1.0, "nsd": 1.0}, {"modality": "US", "dsc": 0.0, "nsd": 0.0},
            {"modality": "CT", "dsc": 0.5, "nsd": 0.25}]
    summary = {s["group"]: s for s in summarize(rows)}
    assert [s for s in summary][:2] == ["CT", "US"]  # modality order of the challenge
    assert summary["mean over modalities"]["dsc"] == pytest.approx(0.5)
    assert summary["mean over cases"]["nsd"] == pytest.approx(1.25 / 3)


def test_bad_input_corpus(tmp_path, capsys):
    from tests.helpers import assert_reported, write_file_problems, write_good, write_not_npz

    segs, gts = tmp_path / "segs", tmp_path / "gts"
    bad = write_file_problems(segs)
    good = write_good(gts)
    for name in good + list(bad):
        if name in good:
            write_npz(segs / name, segs=np.load(gts / name)["gts"])
        write_npz(gts / name, **{k: v for k, v in np.load(gts / name).items()} if name in good else
                  dict(gts=np.ones((4, 4), np.uint8), spacing=np.ones(2)))
    not_read = write_not_npz(segs)
    assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv")]) == 1
    assert_reported(capsys.readouterr().err, {**bad, **not_read})
    rows = {r["case"]: r["dsc"] for r in read_csv(tmp_path / "m.csv")}
    assert rows == {name: "1.0000" for name in good}  # the 300-label uint16 case too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gts", "m.csv", "m_summary.csv", "segs"]
    (tmp_path / "empty").mkdir()
    assert main(["--segs", str(tmp_path / "empty"), "--gts", str(gts), "--out", str(tmp_path / "n.csv")]) == 2
    assert "no .npz files" in capsys.readouterr().err


def _ten_cases(tmp_path, missing: int):
    segs, gts = tmp_path / "segs", tmp_path / "gts"
    segs.mkdir(), gts.mkdir()
    mask = np.zeros((30, 30), np.uint8)
    mask[5:15, 5:15] = 1
    for i in range(10):
        name = f"2DBox_{'CT' if i < 3 else 'US'}_{i}.npz"
        write_npz(gts / name, gts=mask, spacing=np.ones(2))
        if i >= missing:
            write_npz(segs / name, segs=mask)
    return segs, gts


def test_missing_segmentations_are_named_and_scored_zero(tmp_path, capsys):
    """3 of 10 segmentations missing (all the CT ones): they count as DSC 0, NSD 0, as the challenge scores them."""
    segs, gts = _ten_cases(tmp_path, missing=3)
    assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv")]) == 1
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "segmentation" in line]
    assert "3 of 10 cases have no segmentation" in line and "2DBox_CT_0.npz, 2DBox_CT_1.npz, 2DBox_CT_2.npz" in line
    rows = {r["case"]: r for r in read_csv(tmp_path / "m.csv")}
    assert len(rows) == 10 and rows["2DBox_CT_1.npz"]["dsc"] == "0.0000" and rows["2DBox_CT_1.npz"]["status"] == "missing"
    summary = {r["group"]: r for r in read_csv(tmp_path / "m_summary.csv")}
    assert summary["CT"]["dsc"] == "0.0000" and summary["CT"]["cases"] == "3"  # the modality stays in the means
    assert summary["mean over cases"]["dsc"] == "0.7000" and summary["mean over modalities"]["dsc"] == "0.5000"

    assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "s.csv"), "--skip-missing"]) == 0
    assert "left out (--skip-missing)" in capsys.readouterr().err
    summary = {r["group"]: r for r in read_csv(tmp_path / "s_summary.csv")}
    assert "CT" not in summary and summary["mean over cases"]["dsc"] == "1.0000"


def test_out_never_replaces_an_input_and_write_errors_are_reported(tmp_path, capsys):
    segs, gts = _ten_cases(tmp_path, missing=0)
    seg = segs / "2DBox_US_5.npz"
    before = seg.read_bytes()
    for out in (seg, gts / "2DBox_US_5.npz", segs):  # a usage error: exit 2 (missing cases are exit 1)
        assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(out)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and "--out is the input" in line
    assert seg.read_bytes() == before
    (tmp_path / "m.csv").mkdir()  # an output that cannot be replaced: named, the summary still written
    assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv")]) == 1
    assert f"error: {tmp_path / 'm.csv'}: cannot be written" in capsys.readouterr().err
    assert (tmp_path / "m_summary.csv").is_file()
