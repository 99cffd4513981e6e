"""Run a recipe: the stages that make a shipped model, from its teacher to its INT8 form and its board.

    python -m distill.recipe recipes/cp_tinyvit_fast.toml [--data TRAIN_DIR ...] [--val VAL_DIR ...]
                             [--out runs/recipe/NAME] [--device cpu|cuda] [--until STAGE] [--smoke]
                             [--teacher-checkpoint medsam_vit_b.pth] [--threads N]

A recipe (TOML) is a list of `[[stages]]`, each with a `name`, a `kind` and its options:
  distill    python -m distill.run        a student encoder learns a teacher's embeddings (and masks, ground truth)
  finetune   python -m distill.finetune   decoder, class prompt and modality head; head_only = true: the head refit
  prune      python -m compress.prune     structured pruning and recovery
  quantize   python -m compress.quantize  static INT8
  benchmark  python -m benchmarks.run     the board (DSC / NSD per modality, latency) of `models`
A stage's options are its command's, by their names (`lr`, `slice_step`, `gt_loss_weight`; a switch is true or
false), checked as the command checks them. Its models (`init`, `teacher`, `decoder_from`, `model`, `models`) are
zoo names, paths, or "@STAGE": the output of an earlier stage. The data, output folders and devices are this
command's (--data, --val, --out, --device). `extends = "base.toml"` puts a base recipe's stages first; both run
into the base's --out by default, so they share its outputs. The whole recipe is checked before any stage runs:
an unknown kind or option, a bad value or a missing input is one line naming the file and the problem.

Each stage runs in OUT/<stage>-<key>/, where the key hashes its kind, options, inputs (an earlier stage's key, a
file's sha256) and the listing of its data; stage.json, written when the stage is done, adds the code (the packages'
source files). A stage done with the same key and code is not run again; changing one option reruns that stage and
the ones after it. Output made by other code is moved aside (OUT/<stage>-<key>.code-<sha>) and made again, unless
--ignore-code-changes reuses it. A stage that
was interrupted resumes from its last checkpoint. After each stage the model is scored on the val split (per slice,
as distill.finetune validates) and the checkpoint it wrote gets its provenance (metadata 'recipe': the recipe text,
the stage, the git commit, the train data listing's hash, the val scores), which `zoo.index add` copies into the
zoo's index. OUT/stages.csv lists every stage's time and val scores.

--smoke runs every stage on 4 samples for 1 step (the head refit 100 steps, quantize on 4 images, the board on one
case per modality, without timing): a check that the recipe runs end to end, in minutes, into OUT/smoke.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import tomllib

from distill.teachers import CHECKPOINT_ENV
from zoo.cli import RUNS_DIR, positive_int, run_cli
from zoo.data.io import atomic_path, data_split, write_csv_atomic
from zoo.models.checkpoint import code_revision, update_metadata
from zoo.models.weights import LITEMEDSAM, sha256_file

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("zoo", "distill", "compress", "benchmarks")
STAGE_RECORD = "stage.json"
RESERVED = ("name", "kind", "why", "publish")
BOARD_FILES = ("*.csv", "*.png")  # what a board publishes
SMOKE_SAMPLES = 4
SMOKE_HEAD_EPOCHS = 100  # the modality head's refit, 3000 full-batch steps in a real run


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the problem."""


@dataclass(frozen=True)
class StageKind:
    """A kind of stage: the command it runs, which of its options name models, and what it leaves behind."""

    module: str
    inputs: tuple[str, ...]  # options whose values are models (zoo names, paths, @stage)
    output: str  # in the stage's folder
    managed: tuple[str, ...]  # options this runner sets (data, outputs, device, resuming)
    smoke: tuple[tuple[str, object], ...]  # --smoke's option values
    uses_val: bool = False


_TRAINING_SMOKE = (("max_samples", SMOKE_SAMPLES), ("batch_size", SMOKE_SAMPLES), ("accumulate", 1), ("epochs", 1),
                   ("max_steps", 1))
KINDS = {
    "distill": StageKind("distill.run", ("teacher", "init", "decoder_from"), "student.pt",
                         ("data", "out", "device", "resume", "cache_dir", "teacher_checkpoint"), _TRAINING_SMOKE),
    "finetune": StageKind("distill.finetune", ("init", "click_decoder_from"), "best.pt",
                          ("data", "val", "out", "device", "resume", "cache_dir"),
                          _TRAINING_SMOKE + (("head_epochs", SMOKE_HEAD_EPOCHS),), uses_val=True),
    "prune": StageKind("compress.prune", ("model",), "pruned.pt",
                       ("data", "out", "work", "device", "resume", "cache_dir"), _TRAINING_SMOKE),
    "quantize": StageKind("compress.quantize", ("model",), "variant", ("calib", "check", "out", "ship"),
                          (("n_calib", SMOKE_SAMPLES), ("n_check", 2)), uses_val=True),
    "benchmark": StageKind("benchmarks.run", ("models",), "leaderboard.csv",
                           ("data", "out", "merge", "save_segs", "cache_dir"),
                           (("all", False), ("cases_per_modality", 1), ("no_latency", True)), uses_val=True),
}
# Model names an input may take besides zoo names, paths and @stage.
SPECIAL_INPUTS = {"teacher": ("medsam", "sam", LITEMEDSAM), "init": (LITEMEDSAM, "none")}


@dataclass
class Stage:
    name: str
    kind: str
    options: dict  # the recipe's keys, as written
    why: str = ""
    publish: str | None = None  # a board's folder in the repository (e.g. benchmarks/compression), kept in step

    @property
    def spec(self) -> StageKind:
        return KINDS[self.kind]


@dataclass
class Recipe:
    path: Path
    name: str
    description: str
    stages: list[Stage]
    texts: dict[str, str]  # every file read (a base recipe's too): path -> text
    out_name: str  # the default --out: runs/recipe/<the root base's name>


# -- reading and checking --------------------------------------------------------------------------------------
def read_recipe(path: Path, _seen: tuple[Path, ...] = ()) -> Recipe:
    """The recipe at `path` with its base's stages first (`extends`); RecipeError naming the file and problem."""
    path = Path(path)
    if path.resolve() in _seen:
        raise RecipeError(f"{path}: extends itself (through {', '.join(map(str, _seen))})")
    try:
        text = path.read_text()
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err.strerror or err})") from err
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{path}: not valid TOML ({err})") from err
    unknown = set(document) - {"name", "description", "extends", "stages"}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (a recipe has name, description, "
                          "extends and [[stages]])")
    base = None
    if "extends" in document:
        base = read_recipe(path.parent / str(document["extends"]), (*_seen, path.resolve()))
    tables = document.get("stages", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise RecipeError(f"{path}: 'stages' must be a list of [[stages]] tables")
    if not tables and base is None:
        raise RecipeError(f"{path}: no [[stages]]")
    stages = list(base.stages) if base else []
    for number, table in enumerate(tables, start=1):
        stages.append(_stage(path, number, table, [s.name for s in stages]))
    name = str(document.get("name", path.stem))
    return Recipe(path, name, str(document.get("description", "")), stages,
                  {**(base.texts if base else {}), str(path): text}, base.out_name if base else name)


def _stage(path: Path, number: int, table: dict, earlier: list[str]) -> Stage:
    name, kind = table.get("name"), table.get("kind")
    where = f"{path}: stage {number}"
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise RecipeError(f"{where}: needs a name of letters, digits, '_' and '-' (got {name!r})")
    if name in earlier:
        raise RecipeError(f"{path}: two stages are named {name!r}")
    if kind not in KINDS:
        raise RecipeError(f"{path}: stage {name!r}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    options = {k: v for k, v in table.items() if k not in RESERVED}
    publish = table.get("publish")
    if publish is not None and (kind != "benchmark" or not isinstance(publish, str) or Path(publish).is_absolute()):
        raise RecipeError(f"{path}: stage {name!r}: 'publish' is a board's folder, relative to where the recipe runs")
    return Stage(name, kind, options, str(table.get("why", "")), publish)


def _parser(kind: str) -> argparse.ArgumentParser:
    return importlib.import_module(KINDS[kind].module).build_parser()


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's options by destination name (the names a recipe uses)."""
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def _model_of(item: str) -> str:
    """The model of an input value: a board entry may be LABEL=MODEL."""
    label, equals, model = item.partition("=")
    return model if equals else item


def _references(value) -> list[str]:
    """The @stage names in an input value (a string, or a list of them)."""
    models = [_model_of(str(v)) for v in (value if isinstance(value, list) else [value])]
    return [m[1:] for m in models if m.startswith("@")]


def check_recipe(recipe: Recipe, teacher_checkpoint: str | None) -> None:
    """Every stage's options exist and parse as its command parses them, and every input is there (an earlier
    stage, a zoo model, a file): RecipeError naming the file, the stage and the problem, before anything runs."""
    from zoo.index import zoo_names

    names = zoo_names()
    for position, stage in enumerate(recipe.stages):
        where = f"{recipe.path}: stage {stage.name!r} ({stage.kind})"
        actions = _actions(_parser(stage.kind))
        for key, value in stage.options.items():
            if key in stage.spec.managed:
                raise RecipeError(f"{where}: '{key}' is set by distill.recipe (its --data, --val, --out, --device), "
                                  "not by a recipe")
            if key not in actions:
                known = ", ".join(sorted(k for k in actions if k not in stage.spec.managed))
                raise RecipeError(f"{where}: unknown option {key!r}; {stage.kind} takes {known}")
            if actions[key].nargs == 0 and not isinstance(value, bool):
                raise RecipeError(f"{where}: '{key}' is a switch: true or false, not {value!r}")
            if key in stage.spec.inputs:
                _check_input(where, key, value, recipe.stages[:position], names, teacher_checkpoint)
        parse_stage(stage, _argv(stage, {r: Path("checked") for r in _references_of(stage)}), where)


def _references_of(stage: Stage) -> list[str]:
    return [ref for key in stage.spec.inputs if key in stage.options for ref in _references(stage.options[key])]


def _check_input(where: str, key: str, value, earlier: list[Stage], names: list[str], teacher_checkpoint) -> None:
    values = value if isinstance(value, list) else [value]
    if key == "models" and not isinstance(value, list):
        raise RecipeError(f"{where}: 'models' must be a list of zoo names, paths or @stages")
    for item in map(str, values):
        model = _model_of(item)
        if model.startswith("@"):
            if model[1:] not in [s.name for s in earlier]:
                raise RecipeError(f"{where}: {key} = {item!r} names no earlier stage")
        elif model in SPECIAL_INPUTS.get(key, ()):
            if model in ("medsam", "sam") and not (teacher_checkpoint or os.environ.get(CHECKPOINT_ENV)):
                raise RecipeError(f"{where}: the {model} teacher needs a checkpoint: pass --teacher-checkpoint PATH "
                                  f"(or set ${CHECKPOINT_ENV})")
        elif model not in names and not Path(model).exists():
            raise RecipeError(f"{where}: missing input: {key} = {model!r} is neither a zoo model nor an existing file")


def _argv(stage: Stage, outputs: dict[str, Path]) -> list[str]:
    """The stage's options as its command line, with @stage inputs replaced by those stages' outputs."""
    actions = _actions(_parser(stage.kind))
    positional, argv = [], []
    for key, value in stage.options.items():
        action = actions[key]
        if key == "models":  # a board: LABEL=PATH entries, an @stage labelled by the stage's name
            value = ",".join(_resolve(str(v), outputs, labelled=True) for v in value)
        elif key in stage.spec.inputs:
            value = _resolve(str(value), outputs)
        if not action.option_strings:
            positional.append(str(value))
        elif isinstance(value, bool) and action.nargs == 0:  # a switch: given when it turns its default around
            if value != action.default:
                argv.append(action.option_strings[0])
        elif isinstance(value, list):
            argv += [action.option_strings[0], *map(str, value)]
        else:
            argv += [action.option_strings[0], str(value)]
    return positional + argv


def _resolve(item: str, outputs: dict[str, Path], labelled: bool = False) -> str:
    """'@stage' -> that stage's output; on a board (labelled) 'LABEL=@stage' keeps its label and a bare '@stage'
    is labelled by the stage's name."""
    label, equals, model = item.partition("=")
    if not equals:
        label, model = "", item
    if not model.startswith("@"):
        return item
    path = str(outputs[model[1:]])
    return f"{label or model[1:]}={path}" if labelled else path


def parse_stage(stage: Stage, argv: list[str], where: str) -> argparse.Namespace:
    """The stage's arguments parsed by its command's own parse_args; its usage error becomes a RecipeError."""
    module = importlib.import_module(stage.spec.module)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return module.parse_args(argv)
    except SystemExit as exit_:
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else f"exit {exit_.code}"
        raise RecipeError(f"{where}: {message} (command line: {' '.join(argv)})") from None


# -- keys: what a stage's output depends on --------------------------------------------------------------------
def code_sha256() -> str:
    """sha256 of the packages' Python sources (names and contents): the code version a stage's key covers."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((PACKAGE_ROOT / package).rglob("*.py")):
            digest.update(f"{path.relative_to(PACKAGE_ROOT).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def listing_sha256(folders: list[Path]) -> str:
    """sha256 of a data listing: each folder's npz files by name and size, in order."""
    digest = hashlib.sha256()
    for folder in folders:
        if not Path(folder).is_dir():
            raise RecipeError(f"{folder}: no such data directory")
        for path in sorted(Path(folder).glob("*.npz")):
            digest.update(f"{path.name}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def input_identity(value: str, keys: dict[str, str], teacher_checkpoint: str | None) -> str:
    """What an input is, for a stage's key: an earlier stage's key, a teacher checkpoint's or a file's sha256, a
    zoo entry (its file's sha256, and its parent's for a derived one)."""
    from zoo.index import read_index

    label, equals, model = value.partition("=")
    if not equals:
        label, model = "", value
    if model.startswith("@"):
        return f"{label}=stage:{keys[model[1:]]}"
    if model in ("medsam", "sam"):
        return f"{model}:{sha256_file(teacher_checkpoint or os.environ[CHECKPOINT_ENV])}"
    entries = {e["name"]: e for e in read_index()}
    if model in entries:
        entry = entries[model]
        parent = entries.get(entry.get("derived_from") or "", {})
        fields = ("name", "sha256", "derived_from", "export", "precision")
        return f"{label}=zoo:" + json.dumps([{k: e.get(k) for k in fields} for e in (entry, parent)], sort_keys=True)
    path = Path(model)
    if path.is_dir():
        return f"{label}=dir:" + sha256_file(path / "manifest.json")
    if path.is_file():
        return f"{label}=file:" + sha256_file(path)
    return f"{label}={model}"  # 'none'


def stage_options(stage: Stage, smoke: bool) -> Stage:
    """The stage as it runs: with --smoke, its sample counts, steps and boards cut to a minimum."""
    if not smoke:
        return stage
    actions = _actions(_parser(stage.kind))
    cut = {k: v for k, v in stage.spec.smoke if k in actions}
    if stage.kind == "prune" and stage.options.get("epochs") == 0:
        cut.pop("epochs", None)  # prune only: no recovery to cut
    return Stage(stage.name, stage.kind, {**stage.options, **cut}, stage.why)  # a smoke board is not published


def stage_key(stage: Stage, keys: dict[str, str], context: dict, with_code: bool = True) -> str:
    """sha256 over the stage's kind, options, inputs, the code and its data listings (train; val where it uses it);
    without the code (with_code False) it names the stage's folder."""
    inputs = {key: [input_identity(str(v), keys, context["teacher_checkpoint"]) for v in
                    (stage.options[key] if isinstance(stage.options[key], list) else [stage.options[key]])]
              for key in stage.spec.inputs if key in stage.options}
    record = {"kind": stage.kind, "argv": _argv(stage, {r: Path(f"@{r}") for r in _references_of(stage)}),
              "inputs": inputs, "code": context["code"] if with_code else None, "smoke": context["smoke"],
              "data": context["data_sha256"] if stage.kind != "benchmark" else None,
              "val": context["val_sha256"] if stage.spec.uses_val else None}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# -- running a stage -------------------------------------------------------------------------------------------
def managed_argv(stage: Stage, folder: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    """The options this runner sets: data, output, device, resuming (and threads where the command has them)."""
    data, val = [str(d) for d in args.data], [str(v) for v in args.val]
    device = ["--device", args.device]
    again = ["--resume"] if resume else []
    argv = {
        "distill": ["--data", *data, "--out", str(folder), *device, *again]
        + (["--teacher-checkpoint", args.teacher_checkpoint] if args.teacher_checkpoint else []),
        "finetune": ["--data", *data, "--val", *val, "--out", str(folder), *device, *again],
        "prune": ["--data", *data, "--out", str(folder / "pruned.pt"), "--work", str(folder / "work"), *device, *again],
        "quantize": ["--calib", *data, "--check", *val, "--out", str(folder / "variant")],
        "benchmark": ["--data", val[0], "--out", str(folder)],
    }[stage.kind]
    if args.threads and "threads" in _actions(_parser(stage.kind)):
        argv += ["--threads", str(args.threads)]
    return argv


def execute(stage: Stage, folder: Path, outputs: dict[str, Path], args: argparse.Namespace, where: str) -> list[str]:
    """Run the stage's command into `folder` (resuming what an earlier attempt left); the input files it skipped."""
    output = folder / stage.spec.output
    if stage.kind in ("prune", "quantize") and output.exists():
        return []  # written whole (atomically) by the attempt that was interrupted after it
    resume = stage.kind in ("distill", "finetune", "prune") and folder.exists()
    if stage.kind == "benchmark" and len(args.val) > 1:
        raise RecipeError(f"{where}: a board scores one val directory; got {len(args.val)} (--val)")
    folder.mkdir(parents=True, exist_ok=True)
    namespace = parse_stage(stage, _argv(stage, outputs) + managed_argv(stage, folder, args, resume), where)
    namespace.skipped = []
    importlib.import_module(stage.spec.module).run(namespace)
    if not output.exists():
        raise RecipeError(f"{where}: the stage ended without writing {output}")
    return namespace.skipped


def val_scores(stage: Stage, output: Path, val_dirs: list[Path], smoke: bool) -> dict:
    """The stage's val scores: a board's rows; a fine-tuned model's own validation; else the model scored per slice
    on the val split (every 2D image and every 5th slice with an object, each object prompted by its tight box)."""
    from zoo.data.io import read_csv
    from zoo.models.checkpoint import load_checkpoint

    if stage.kind == "benchmark":
        return {row["model"]: {"dsc": float(row["dsc_mean_modalities"]), "nsd": float(row["nsd_mean_modalities"])}
                for row in read_csv(output) if row["dsc_mean_modalities"]}
    if stage.kind == "finetune":
        val = load_checkpoint(output)[1].get("val", {})
        if "dsc" in val:
            return {k: val[k] for k in ("dsc", "nsd", "head_accuracy", "per_modality") if k in val}
    from zoo.data.samples import find_samples
    from zoo.index import load
    from zoo.validate import score_samples

    model = load(output)
    samples = find_samples(val_dirs, 5, None, 0, foreground_only=True, max_samples=SMOKE_SAMPLES if smoke else None)
    result = score_samples(model, samples)
    scores = {k: result[k] for k in ("dsc", "nsd", "head_accuracy")}
    scores["per_modality"] = {m: {"dsc": d, "nsd": n} for m, (d, n) in result["per_modality"].items()}
    return scores


def record_provenance(stage: Stage, output: Path, provenance: dict) -> None:
    """The stage's provenance in the model it wrote: a checkpoint's metadata, an exported variant's manifest."""
    if output.suffix == ".pt":
        update_metadata(output, {"recipe": provenance})
    elif output.is_dir():
        manifest_path = output / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["metadata"]["recipe"] = provenance
        with atomic_path(manifest_path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def publish_board(folder: Path, target: Path) -> list[Path]:
    """The board's CSV files and plots copied into `target` (each atomically); that folder's other CSV and PNG files,
    from an earlier board, are removed (git keeps them): the folder is this board, whole."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(f for pattern in BOARD_FILES for f in folder.glob(pattern))
    for file in files:
        with atomic_path(target / file.name) as tmp:
            shutil.copyfile(file, tmp)
    names = {f.name for f in files}
    for stale in [f for pattern in BOARD_FILES for f in target.glob(pattern) if f.name not in names]:
        stale.unlink()
    return [target / f.name for f in files]


def read_record(folder: Path) -> dict | None:
    path = folder / STAGE_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None  # an unreadable record: the stage is run (resumed) again


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _score_text(scores: dict) -> str:
    if "dsc" in scores:
        head = f", head {scores['head_accuracy']:.3f}" if isinstance(scores.get("head_accuracy"), float) else ""
        return f"val DSC {scores['dsc']:.4f} NSD {scores['nsd']:.4f}{head}"
    return "; ".join(f"{name} DSC {s['dsc']:.4f} NSD {s['nsd']:.4f}" for name, s in scores.items())


SUMMARY_FIELDS = ["stage", "kind", "status", "seconds", "val_dsc", "val_nsd", "head_accuracy", "folder"]


# -- the command -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distill.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="a recipe file, e.g. recipes/cp_tinyvit_fast.toml")
    p.add_argument("--data", type=Path, nargs="+", default=[data_split("train")], help="training npz directories")
    p.add_argument("--val", type=Path, nargs="+", default=[data_split("val")], help="model selection npz directories")
    p.add_argument("--out", type=Path, default=None, help="where the stages run (default runs/recipe/<recipe name>)")
    p.add_argument("--device", default=None, help="cpu or cuda for the training stages (default: cuda where there is one)")
    p.add_argument("--until", default=None, metavar="STAGE", help="stop after this stage")
    p.add_argument("--smoke", action="store_true", help="every stage on 4 samples for 1 step, into OUT/smoke")
    p.add_argument("--teacher-checkpoint", default=None, help=f"MedSAM / SAM checkpoint (default ${CHECKPOINT_ENV})")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads of every stage")
    p.add_argument("--list", action="store_true", help="only say which stages are up to date and which would run")
    p.add_argument("--ignore-code-changes", action="store_true",
                   help="reuse a stage's output made by other code when its options, inputs and data are the same "
                        "(after a change known not to touch it); each reuse is named")
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Run (or with --list, plan) the recipe's stages in order; a row per stage (see SUMMARY_FIELDS)."""
    from distill.train import default_device

    recipe = read_recipe(args.recipe)
    check_recipe(recipe, args.teacher_checkpoint)
    stages = recipe.stages
    if args.until is not None:
        names = [s.name for s in stages]
        if args.until not in names:
            raise RecipeError(f"{args.recipe}: --until {args.until!r} is not one of its stages ({', '.join(names)})")
        stages = stages[: names.index(args.until) + 1]
    args.device = args.device or default_device()
    out = (args.out or RUNS_DIR / "recipe" / recipe.out_name) / ("smoke" if args.smoke else "")
    context = {"code": code_sha256(), "smoke": args.smoke, "teacher_checkpoint": args.teacher_checkpoint,
               "data_sha256": listing_sha256(args.data), "val_sha256": listing_sha256(args.val)}
    base = {"file": str(recipe.path), "recipe_sha256": hashlib.sha256(recipe.texts[str(recipe.path)].encode()).hexdigest(),
            "git_commit": code_revision(), "code_sha256": context["code"], "train_data": [str(d) for d in args.data],
            "train_data_sha256": context["data_sha256"], "val_data": [str(v) for v in args.val],
            "val_data_sha256": context["val_sha256"], "smoke": args.smoke}
    keys, outputs, rows = {}, {}, []
    for number, stage in enumerate(stages, start=1):
        stage = stage_options(stage, args.smoke)
        where = f"{recipe.path}: stage {stage.name!r} ({stage.kind})"
        key = keys[stage.name] = stage_key(stage, keys, context)
        recipe_key = stage_key(stage, keys, context, with_code=False)
        folder = out / f"{stage.name}-{recipe_key[:12]}"
        output = outputs[stage.name] = folder / stage.spec.output
        record = read_record(folder)
        step = f"[{number}/{len(stages)}] {stage.name} ({stage.kind})"
        if record is not None and (record.get("key") == key or args.ignore_code_changes):
            keys[stage.name] = record["key"]  # what later stages were (or will be) made from
            other_code = "" if record["key"] == key else f" (made by other code: git {record['git_commit'][:12]})"
            print(f"{step}: up to date in {folder}{other_code}; {_score_text(record['val'])}", flush=True)
            rows.append(_row(stage, "up to date", record, folder))
            _publish(stage, folder, args)
            continue
        if record is not None and not args.list:  # made by other code: kept beside, and made again
            aside = folder.with_name(f"{folder.name}.code-{record['code_sha256'][:8]}")
            print(f"{step}: its output was made by other code; moved to {aside}", flush=True)
            os.rename(folder, aside)
        if args.list:
            print(f"{step}: {'would resume' if folder.exists() else 'would run'} in {folder}", flush=True)
            rows.append(_row(stage, "to run", None, folder))
            continue
        print(f"{step}: {'resuming' if folder.exists() else 'running'} in {folder}", flush=True)
        started = time.time()
        skipped = execute(stage, folder, outputs, args, where)
        seconds = time.time() - started
        scores = val_scores(stage, output, args.val, args.smoke)
        record = {**base, "stage": stage.name, "kind": stage.kind, "key": key, "recipe_key": recipe_key, "why": stage.why,
                  "options": stage.options, "val": scores, "seconds": round(seconds, 1),
                  "val_seconds": round(time.time() - started - seconds, 1), "skipped": skipped,
                  "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "output": str(output)}
        record_provenance(stage, output, {**record, "recipe_text": recipe.texts})
        with atomic_path(folder / STAGE_RECORD) as tmp:  # last: it marks the stage done
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        print(f"{step}: done in {_duration(seconds)}; {_score_text(scores)}", flush=True)
        rows.append(_row(stage, "ran", record, folder))
        _publish(stage, folder, args)
    if not args.list:
        out.mkdir(parents=True, exist_ok=True)
        write_csv_atomic(out / "stages.csv", rows, SUMMARY_FIELDS)
        print(f"stages: {out / 'stages.csv'}; last output: {outputs[stages[-1].name]}")
    return rows


def _publish(stage: Stage, folder: Path, args: argparse.Namespace) -> None:
    if stage.publish and not args.smoke and not args.list:
        published = publish_board(folder, Path(stage.publish))
        print(f"published {len(published)} board files into {stage.publish}", flush=True)


def _row(stage: Stage, status: str, record: dict | None, folder: Path) -> dict:
    scores = (record or {}).get("val", {})
    return {"stage": stage.name, "kind": stage.kind, "status": status, "seconds": (record or {}).get("seconds", ""),
            "val_dsc": scores.get("dsc", ""), "val_nsd": scores.get("nsd", ""),
            "head_accuracy": scores.get("head_accuracy", ""), "folder": str(folder)}


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
