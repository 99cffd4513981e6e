"""Every command ends a run stopped by bad input the same way: exit code 2 and one line naming what is missing (library
functions raise typed errors; only zoo.cli's runners turn them into exit codes)."""

import importlib

import pytest

MISSING = "does/not/exist"


@pytest.mark.parametrize("module, argv", [
    ("zoo.predict", ["-i", MISSING, "-o", "{tmp}/out", "--model", "litemedsam"]),
    ("zoo.segment", [MISSING, "-o", "{tmp}/out", "--boxes", "{tmp}/boxes.json"]),
    ("zoo.convert", [MISSING, "{tmp}", "-o", "{tmp}/out", "--modality", "CT"]),
    ("zoo.index", ["add", "new_model", MISSING + ".pt"]),
    ("benchmarks.run", ["--data", MISSING, "--models", "litemedsam", "--out", "{tmp}/board"]),
    ("benchmarks.evaluate", ["--segs", MISSING, "--gts", "{tmp}", "--out", "{tmp}/m.csv"]),
    ("distill.run", ["--teacher", "litemedsam", "--data", MISSING, "--out", "{tmp}/d"]),
    ("distill.finetune", ["--init", "litemedsam", "--data", MISSING, "--out", "{tmp}/f"]),
    ("distill.recipe", [MISSING + ".toml"]),
    ("compress.export", [MISSING + ".pt", "--out", "{tmp}/e"]),
    ("compress.quantize", [MISSING + ".pt", "--out", "{tmp}/q"]),
    ("compress.prune", [MISSING + ".pt", "--out", "{tmp}/p.pt"]),
])
def test_a_missing_input_is_one_line_and_exit_2(module, argv, tmp_path, capsys):
    (tmp_path / "boxes.json").write_text("{}")
    code = importlib.import_module(module).main([a.format(tmp=tmp_path) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "does/not/exist" in err[0], (code, err)
