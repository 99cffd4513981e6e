"""What the repository commits: a model file (over 1 MB) only when the zoo ships it. Candidates live in runs/ (ignored);
every committed model file stays in git history, so one is committed once, when it replaces the shipped model."""

import json
import subprocess

import pytest

from tests.helpers import REPO

LIMIT = 1 << 20


def shipped_files() -> set[str]:
    """Files the zoo index names: its checkpoints and every file of its shipped variant folders' manifests."""
    shipped = set()
    for entry in json.loads((REPO / "zoo" / "index.json").read_text())["models"]:
        if not entry.get("file"):
            continue
        path = REPO / "zoo" / entry["file"]
        shipped.add(path.relative_to(REPO).as_posix())
        if path.name == "manifest.json":
            for part in json.loads(path.read_text())["files"].values():
                shipped.update((path.parent / name).relative_to(REPO).as_posix() for name in part["sha256"])
    return shipped


def test_no_large_file_is_committed_unless_the_zoo_ships_it():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout (an installed package)")
    large = [name for name in listed.stdout.decode().split("\0") if name and (REPO / name).is_file()
             and (REPO / name).stat().st_size > LIMIT]
    assert sorted(set(large) - shipped_files()) == []
