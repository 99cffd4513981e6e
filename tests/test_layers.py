"""The stages import one way: zoo is the bottom floor and imports neither compress nor distill, not even lazily."""

import subprocess
import sys

from tests.helpers import REPO

# Loading a model, a derived (exported-on-first-load) entry included, and segmenting go through these.
ZOO_ENTRY_POINTS = ("zoo.index", "zoo.predict", "zoo.runtime.export", "zoo.cli")


def test_zoo_imports_neither_compress_nor_distill():
    script = (
        "import sys\n"
        f"for name in {ZOO_ENTRY_POINTS!r}:\n"
        "    __import__(name)\n"
        "import zoo.index\n"
        "zoo.index.derived_entry  # the derived-entry path resolves its exporter inside zoo\n"
        "above = sorted(m for m in sys.modules if m.split('.')[0] in ('compress', 'distill', 'benchmarks'))\n"
        "print(','.join(above))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"zoo pulled in: {out.stdout.strip()}"


def test_no_zoo_module_names_a_stage_above_it():
    """Also catches an import inside a function body, which importing the module does not run."""
    offenders = [f"{path.relative_to(REPO)}: {line.strip()}" for path in sorted((REPO / "zoo").glob("*.py"))
                 for line in path.read_text().splitlines()
                 if line.strip().startswith(("import ", "from ")) and line.split()[1].split(".")[0] in ("compress", "distill", "benchmarks")]
    assert offenders == []
