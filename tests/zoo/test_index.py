import json

import pytest

import zoo.index
from zoo.models.checkpoint import load_checkpoint
from zoo.runtime.exported import read_manifest

VNNI = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16")  # e.g. AMD Zen 4, Intel Ice Lake and later
BF16_ONLY = ("avx2", "avx512f", "avx512_bf16")
AVX2_ONLY = ("avx2",)


@pytest.mark.parametrize("flags, precision", [(VNNI, "int8"), (BF16_ONLY, "bf16"), (AVX2_ONLY, "fp32")])
def test_auto_is_the_champion_in_the_cpus_fastest_precision(flags, precision):
    table = json.loads(zoo.index.INDEX_PATH.read_text())["auto"]
    name, why = zoo.index.resolve_model("auto", flags)
    assert name == table[precision] and why.startswith(f"{precision}: this CPU")
    entry = next(e for e in zoo.index.read_index() if e["name"] == name)
    assert entry["precision"] == precision and entry["backend"] == "openvino"
    assert zoo.index.resolve_model("cp_tinyvit", flags) == ("cp_tinyvit", None)  # an explicit model always wins


def test_auto_is_the_default_of_every_command_and_says_what_it_picked(capsys):
    import zoo.app
    import zoo.predict
    import zoo.segment

    assert zoo.predict.parse_args(["-i", "x", "-o", "y"]).model == "auto"
    assert zoo.segment.parse_args(["x", "-o", "y", "--boxes", "b.json"]).model == "auto"
    assert zoo.app.parse_args([]).model == "auto"
    model = zoo.index.load()
    name, why = zoo.index.resolve_model("auto")
    assert f"model auto: {name} ({why})" in capsys.readouterr().err
    assert model.backend == "openvino"


def test_no_zoo_entry_descends_from_a_file_the_zoo_no_longer_ships():
    """Every variant's parent is a zoo entry, and the file it was made from is the one that entry ships today."""
    entries = {e["name"]: e for e in zoo.index.read_index()}
    stale = []
    for entry in entries.values():
        if entry.get("derived_from"):
            parent = entries.get(entry["derived_from"])
            made_from = read_manifest((zoo.index.ZOO_DIR / entry["file"]).parent)["metadata"].get("parent_sha256") \
                if entry.get("file") else None
            if parent is None or (made_from is not None and made_from != parent["sha256"]):
                stale.append(entry["name"])
        elif str(entry.get("file") or "").endswith(".pt"):
            metadata = load_checkpoint(zoo.index.ZOO_DIR / entry["file"])[1]
            if metadata.get("parent") and zoo.index.model_parent(entry["name"]) not in entries:
                stale.append(f"{entry['name']} (from {zoo.index.model_parent(entry['name'])})")
    assert stale == []


def test_the_click_model_that_messages_name_ships_and_was_trained_for_clicks():
    from zoo.interactive import CLICK_MODEL
    from zoo.models.checkpoint import read_payload

    entries = {e["name"]: e for e in zoo.index.read_index()}
    parent = entries[entries[CLICK_MODEL]["derived_from"]]  # an export of a committed checkpoint
    assert read_payload(zoo.index.ZOO_DIR / parent["file"])["config"]["clicks_trained"] is True
