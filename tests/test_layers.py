"""The layer order, imports included that only run inside a function:

    zoo.modalities < zoo.data < zoo.models < zoo.runtime < zoo's commands (index, predict, segment, ...)
        < benchmarks < distill < compress

A module imports only its own floor and the floors below it. distill.recipe, the conductor that runs every stage,
stands above them all (it names compress' and benchmarks' commands by module name and runs them)."""

import ast
import subprocess
import sys

from tests.helpers import REPO

FLOORS = ["zoo.modalities", "zoo.data", "zoo.models", "zoo.runtime", "zoo", "benchmarks", "distill", "compress"]
CONDUCTOR = "distill.recipe"
PACKAGES = ("zoo", "benchmarks", "distill", "compress")


def floor(module: str) -> int:
    """The floor of a module: the longest prefix in FLOORS."""
    if module == CONDUCTOR:
        return len(FLOORS)
    matching = [prefix for prefix in FLOORS if module == prefix or module.startswith(prefix + ".")]
    return FLOORS.index(max(matching, key=len))


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def test_every_module_imports_only_its_floor_and_below():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = module_name(path)
            for imported in imported_modules(path):
                if floor(imported) > floor(name):
                    offenders.append(f"{name} ({FLOORS[floor(name)] if floor(name) < len(FLOORS) else 'conductor'}) "
                                     f"imports {imported} ({FLOORS[floor(imported)]})")
    assert offenders == []


def test_the_floors_are_what_the_order_says():
    assert floor("zoo.data.samples") < floor("zoo.models.factory") < floor("zoo.runtime.export") < floor("zoo.index")
    assert floor("zoo.index") < floor("benchmarks.run") < floor("distill.finetune") < floor("compress.prune")
    assert floor("zoo.modalities") == 0 and floor(CONDUCTOR) > floor("compress.quantize")


def test_loading_a_model_does_not_import_training_or_compression_libraries():
    script = (
        "import sys\n"
        "from dataclasses import replace\n"
        "import zoo\n"
        "from zoo.models.factory import create_model\n"
        "from zoo.models.pruning import prunable_units, unit_width\n"
        "for name in ('cp_tinyvit_fast', 'cp_tinyvit_fast_openvino_int8', 'litemedsam'):\n"
        "    zoo.load(name)\n"
        "model = create_model('fast_hr')  # a pruned encoder's shapes, as a pruned checkpoint rebuilds them\n"
        "widths = tuple((n, max(1, unit_width(u) // 2)) for n, u in prunable_units(model.image_encoder).items())\n"
        "create_model(replace(model.config, encoder=replace(model.config.encoder, widths=widths)))\n"
        "heavy = ('torch_pruning', 'nncf', 'optimum', 'neural_compressor', 'distill', 'compress', 'benchmarks')\n"
        "print(','.join(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"zoo.load pulled in: {out.stdout.strip()}"


def test_models_are_built_in_one_place():
    """zoo.models.factory.create_model is the only constructor call of ClassPromptSAM in the packages."""
    calls = [f"{path.relative_to(REPO)}:{node.lineno}" for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "ClassPromptSAM"]
    assert [c.split(":")[0] for c in calls] == ["zoo/models/factory.py"], calls
