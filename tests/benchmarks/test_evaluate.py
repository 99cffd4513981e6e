
import numpy as np
import pytest

from benchmarks.evaluate import main, summarize
from tests.helpers import write_npz
from zoo.io import read_csv


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
    from tests.helpers import assert_reported, write_file_problems, write_good

    segs, gts = tmp_path / "segs", tmp_path / "gts"
    bad = write_file_problems(segs)
    good = write_good(gts)
    for name in good + list(bad):
        if name in good:
            write_npz(segs / name, segs=np.load(gts / name)["gts"])
        write_npz(gts / name, **{k: v for k, v in np.load(gts / name).items()} if name in good else
                  dict(gts=np.ones((4, 4), np.uint8), spacing=np.ones(2)))
    assert main(["--segs", str(segs), "--gts", str(gts), "--out", str(tmp_path / "m.csv")]) == 1
    assert_reported(capsys.readouterr().err, bad)
    rows = {r["case"]: r["dsc"] for r in read_csv(tmp_path / "m.csv")}
    assert rows == {name: "1.0000" for name in good}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gts", "m.csv", "m_summary.csv", "segs"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no .npz files"):
        main(["--segs", str(tmp_path / "empty"), "--gts", str(gts), "--out", str(tmp_path / "n.csv")])
