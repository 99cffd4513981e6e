import json

import numpy as np
import pytest
import torch

from distill import recipe
from tests.helpers import REPO, TINY, TINY_STUDENT, empty_zoo, small_sam_checkpoint, write_npz
from zoo.data.io import read_csv
from zoo.models.checkpoint import load_checkpoint, read_payload, save_checkpoint
from zoo.models.class_prompt import ClassPromptSAM
from zoo.models.weights import sha256_file

RECIPES = REPO / "recipes"


def _image_case(path, rng):
    image = rng.integers(0, 60, (64, 80, 3), dtype=np.uint8)
    gts = np.zeros((64, 80), np.uint8)
    gts[10:30, 12:40] = 1
    gts[40:55, 50:70] = 2
    image[gts > 0] += 150
    write_npz(path, imgs=image, gts=gts, boxes=np.array([[12, 10, 39, 29], [50, 40, 69, 54]]), spacing=np.ones(2))


def _volume_case(path, rng, slices=6):
    image = rng.integers(0, 60, (slices, 48, 48), dtype=np.uint8)
    gts = np.zeros(image.shape, np.uint8)
    gts[:, 10:30, 12:36] = 1
    image[gts > 0] += 150
    write_npz(path, imgs=image, gts=gts, boxes=np.array([[12, 10, 0, 35, 29, slices - 1]]),
              spacing=np.array([3.0, 1.0, 1.0]))


@pytest.fixture
def data(tmp_path):
    """A train split of three 2D modalities and a small CT volume (at least 4 samples with objects at every slice
    step a recipe uses: 10, 5, 3), and a val split of two images (every stage is scored on it)."""
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    for modality in ("US", "OCT", "Dermoscopy"):
        _image_case(tmp_path / "train" / f"2DBox_{modality}_a.npz", rng)
    _volume_case(tmp_path / "train" / "3DBox_CT_a.npz", rng)
    for modality in ("US", "OCT"):
        _image_case(tmp_path / "val" / f"2DBox_{modality}_v.npz", rng)
    return tmp_path


def _run(data, recipe_file, *extra):
    args = recipe.parse_args([str(recipe_file), "--data", str(data / "train"), "--val", str(data / "val"),
                              "--out", str(data / "out"), "--device", "cpu", "--threads", "2", *extra])
    args.skipped = []
    return {row["stage"]: row for row in recipe.run(args)}


EVERY_KIND = """
name = "every_kind"

[[stages]]
name = "student"
kind = "distill"
teacher = "{teacher}"
student = "tiny_test"
init = "none"
max_samples = 4
batch_size = 4
max_steps = 1

[[stages]]
name = "head"
kind = "finetune"
head_epochs = 100
init = "@student"
head_only = true
max_samples = 4
batch_size = 4
half = true

[[stages]]
name = "pruned"
kind = "prune"
model = "@head"
ratio = 0.5
epochs = 0

[[stages]]
name = "pruned_int8"
kind = "quantize"
model = "@pruned"
backend = "openvino"
n_calib = 2
n_check = 1

[[stages]]
name = "board"
kind = "benchmark"
models = ["@head", "@pruned", "@pruned_int8"]
all = true
no_latency = true
"""


def tiny_teacher(data, monkeypatch):
    """A tiny teacher checkpoint in `data`, and the tiny student config registered as 'tiny_test'."""
    from zoo.models.encoders import ENCODER_CONFIGS

    monkeypatch.setitem(ENCODER_CONFIGS, "tiny_test", TINY_STUDENT.encoder)
    torch.manual_seed(0)
    return save_checkpoint(data / "teacher.pt", ClassPromptSAM(TINY), {"stage": "test"})


def test_a_recipe_of_every_stage_kind_runs_records_its_provenance_then_finds_it_up_to_date(data, capsys, monkeypatch):
    """distill, finetune, prune, quantize and benchmark on tiny models: what the shipped recipes chain on real ones
    (test_every_shipped_recipe_checks checks those; `--smoke` runs them in minutes)."""
    (data / "every_kind.toml").write_text(EVERY_KIND.format(teacher=tiny_teacher(data, monkeypatch)))
    rows = _run(data, data / "every_kind.toml")
    stages = ["student", "head", "pruned", "pruned_int8", "board"]
    assert list(rows) == stages and {r["status"] for r in rows.values()} == {"ran"}
    out = capsys.readouterr().out
    for number, name in enumerate(stages, start=1):  # stage k of n, its time and its val score
        assert f"[{number}/{len(stages)}] {name} (" in out
    assert "done in" in out and "val DSC" in out
    assert [r["stage"] for r in read_csv(data / "out" / "stages.csv")] == stages

    # provenance in every model written: the recipe's text, the stage, the commit, the train listing's hash, val scores
    for stage, output in (("student", "student.pt"), ("head", "best.pt"), ("pruned", "pruned.pt")):
        provenance = load_checkpoint(f"{rows[stage]['folder']}/{output}")[1]["recipe"]
        assert provenance["stage"] == stage and provenance["git_commit"]
        assert provenance["recipe_text"][str(data / "every_kind.toml")] == (data / "every_kind.toml").read_text()
        assert provenance["train_data_sha256"] == recipe.listing_sha256([data / "train"])
        assert 0 <= provenance["val"]["dsc"] <= 1
    assert read_payload(rows["head"]["folder"] + "/best.pt")["state_dict"]["mask_decoder.iou_token.weight"].dtype == torch.float16
    manifest = json.loads((data / "out").glob("pruned_int8-*/variant/manifest.json").__next__().read_text())
    assert manifest["metadata"]["recipe"]["stage"] == "pruned_int8" and manifest["precision"] == "int8"
    board = read_csv(next((data / "out").glob("board-*/leaderboard.csv")))
    assert len(board) == 3 and all(0 <= float(r["dsc_mean_modalities"]) <= 1 for r in board)

    again = _run(data, data / "every_kind.toml")
    assert {r["status"] for r in again.values()} == {"up to date"}


TWO_STAGES = """
name = "chain"

[[stages]]
name = "student"
kind = "distill"
teacher = "{teacher}"
student = "tiny_test"
init = "none"
max_samples = 4
batch_size = 4
max_steps = 2
checkpoint_every = 1
lr = {lr}

[[stages]]
name = "longer"
kind = "distill"
teacher = "{teacher}"
student = "tiny_test"
init = "@student"
max_samples = 4
batch_size = 4
max_steps = 1

[[stages]]
name = "head"
kind = "finetune"
head_epochs = 100
init = "@longer"
head_only = true
max_samples = 4
batch_size = 4
"""


@pytest.fixture
def chain(data, monkeypatch):
    """A three-stage recipe of tiny models (teacher and student); write(...) varies its learning rates."""
    teacher = tiny_teacher(data, monkeypatch)

    def write(lr="1e-3", second_lr=None):
        text = TWO_STAGES.format(teacher=teacher, lr=lr)
        if second_lr:
            text = text.replace("max_steps = 1\n", f"max_steps = 1\nlr = {second_lr}\n")
        (data / "chain.toml").write_text(text)
        return data / "chain.toml"

    return write


def test_a_changed_setting_reruns_its_stage_and_the_ones_after_only(data, chain):
    first = _run(data, chain())
    assert [r["status"] for r in first.values()] == ["ran", "ran", "ran"]
    changed = _run(data, chain(second_lr="5e-4"))  # the second stage's learning rate
    assert [r["status"] for r in changed.values()] == ["up to date", "ran", "ran"]
    assert changed["student"]["folder"] == first["student"]["folder"]
    assert changed["longer"]["folder"] != first["longer"]["folder"]  # the first run's output is kept
    assert _run(data, chain(second_lr="5e-4"))["head"]["status"] == "up to date"
    assert [r["status"] for r in _run(data, chain(lr="2e-3")).values()] == ["ran", "ran", "ran"]


def test_an_interrupted_stage_resumes_from_its_checkpoint(data, chain, capsys):
    first = _run(data, chain(), "--until", "student")
    folder = first["student"]["folder"]
    weights = load_checkpoint(folder + "/student.pt")[0].state_dict()
    # as if killed after its last training checkpoint, before the stage was recorded done
    (data / "out" / folder.split("/")[-1] / "stage.json").unlink()
    (data / "out" / folder.split("/")[-1] / "student.pt").unlink()
    assert _run(data, chain(), "--until", "student")["student"]["status"] == "ran"
    assert "student (distill): resuming" in capsys.readouterr().out
    resumed = load_checkpoint(folder + "/student.pt")[0].state_dict()
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)  # no step was trained twice


def test_code_of_another_version_reruns_unless_told(data, chain, monkeypatch, capsys):
    first = _run(data, chain(), "--until", "student")
    monkeypatch.setattr(recipe, "code_sha256", lambda: "another version")
    assert _run(data, chain(), "--until", "student", "--ignore-code-changes")["student"]["status"] == "up to date"
    assert "made by other code" in capsys.readouterr().out
    assert _run(data, chain(), "--until", "student")["student"]["status"] == "ran"
    assert "moved to" in capsys.readouterr().out
    assert len(list((data / "out").glob(first["student"]["folder"].split("/")[-1] + ".code-*"))) == 1  # kept


def test_from_medsam_recipe_takes_the_teacher_by_path(data, tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSAM_CHECKPOINT", raising=False)
    small_sam_checkpoint(tmp_path / "medsam_small.pth")
    rows = _run(data, RECIPES / "from_medsam.toml", "--smoke", "--until", "from_medsam",
                "--teacher-checkpoint", str(tmp_path / "medsam_small.pth"))
    assert [r["status"] for r in rows.values()] == ["ran", "ran"]
    model, metadata = load_checkpoint(rows["from_medsam"]["folder"] + "/best.pt")
    assert model.has_modality_head and metadata["recipe"]["stage"] == "from_medsam"


@pytest.mark.parametrize("text, message", [
    ('[[stages]]\nname = "a"\nkind = "distil"\n', "stage 'a': unknown kind 'distil'"),
    ('[[stages]]\nname = "a"\nkind = "distill"\ngt_los_weight = 1.0\n', "unknown option 'gt_los_weight'"),
    ('[[stages]]\nname = "a"\nkind = "distill"\ninit = "missing.pt"\n', "missing input: init = 'missing.pt'"),
    ('[[stages]]\nname = "a"\nkind = "finetune"\ninit = "@b"\n[[stages]]\nname = "b"\nkind = "distill"\n',
     "init = '@b' names no earlier stage"),
    ('[[stages]]\nname = "a"\nkind = "distill"\nlr = "fast"\n', "argument --lr: invalid float value: 'fast'"),
    ('[[stages]]\nname = "a"\nkind = "distill"\nflip = "no"\n', "'flip' is a switch"),
    ('[[stages]]\nname = "a"\nkind = "distill"\nout = "x"\n', "'out' is set by distill.recipe"),
    ('[[stages]]\nname = "a"\nkind = "quantize"\nmodel = "cp_tinyvit"\nbackend = "tensorrt"\n', "invalid choice: 'tensorrt'"),
    ('[[stages]]\nname = "a"\nkind = "benchmark"\nmodels = "cp_tinyvit"\n', "'models' must be a list"),
    ('[[stages]]\nname = "a"\nkind = "distill"\n[[stages]]\nname = "a"\nkind = "distill"\n', "two stages are named 'a'"),
    ('stage = []\n', "unknown top-level key 'stage'"),
    ('[[stages]\n', "not valid TOML"),
])
def test_a_bad_recipe_fails_before_any_stage_runs_with_one_line(data, text, message, capsys):
    (data / "bad.toml").write_text(text)
    argv = [str(data / "bad.toml"), "--data", str(data / "train"), "--val", str(data / "val"), "--out", str(data / "out")]
    assert recipe.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data / 'bad.toml'}") and message in err[0], err
    assert not (data / "out").exists()


def test_unknown_until_and_missing_data_are_named(data, capsys):
    common = ["--data", str(data / "train"), "--val", str(data / "val"), "--out", str(data / "out")]
    assert recipe.main([str(RECIPES / "cp_tinyvit.toml"), *common, "--until", "nope"]) == 2
    assert "--until 'nope' is not one of its stages" in capsys.readouterr().err
    assert recipe.main([str(RECIPES / "cp_tinyvit.toml"), "--data", str(data / "missing"), "--out", str(data / "out")]) == 2
    assert "missing: no such data directory" in capsys.readouterr().err
    assert recipe.main([str(data / "absent.toml"), *common]) == 2
    assert "absent.toml: cannot read the recipe" in capsys.readouterr().err


def test_every_shipped_recipe_checks(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDSAM_CHECKPOINT", str(tmp_path / "medsam.pth"))  # from_medsam's teacher: by path
    for path in sorted(RECIPES.glob("*.toml")):
        recipe.check_recipe(recipe.read_recipe(path), None)


def test_zoo_index_add_copies_a_recipe_checkpoint_as_it_is_with_its_provenance(tmp_path, monkeypatch):
    import zoo.index

    empty_zoo(tmp_path, monkeypatch)
    provenance = {"file": "recipes/x.toml", "recipe_sha256": "ab" * 32, "stage": "x", "kind": "finetune", "key": "k",
                  "git_commit": "c0ffee", "train_data_sha256": "d" * 64, "val": {"dsc": 0.5, "nsd": 0.6},
                  "recipe_text": {"recipes/x.toml": "name = 'x'"}}
    torch.manual_seed(0)
    source = save_checkpoint(tmp_path / "best.pt", ClassPromptSAM(TINY), {"recipe": provenance}, half=True)
    entry = zoo.index.add_model("x", source)
    assert sha256_file(zoo.index.ZOO_DIR / "x.pt") == sha256_file(source) == entry["sha256"]
    assert entry["stored_as"] == "fp16" and "recipes/x.toml, stage 'x'" in entry["source"]
    assert entry["recipe"]["val"] == {"dsc": 0.5, "nsd": 0.6} and "recipe_text" not in entry["recipe"]


def test_a_board_is_published_whole_into_its_folder(tmp_path):
    board, target = tmp_path / "board", tmp_path / "benchmarks" / "compression"
    board.mkdir()
    target.mkdir(parents=True)
    for name in ("leaderboard.csv", "cases.csv", "radar.png"):
        (board / name).write_text(name)
    (target / "confusion_old_model.png").write_text("an earlier board's")
    (target / "README.md").write_text("kept: not a board file")
    published = recipe.publish_board(board, target)
    assert sorted(p.name for p in published) == ["cases.csv", "leaderboard.csv", "radar.png"]
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "cases.csv", "leaderboard.csv", "radar.png"]
    assert (target / "radar.png").read_text() == "radar.png"
    with pytest.raises(recipe.RecipeError, match="'publish' is a board's folder"):
        (tmp_path / "bad.toml").write_text('[[stages]]\nname = "a"\nkind = "distill"\npublish = "x"\n')
        recipe.read_recipe(tmp_path / "bad.toml")
