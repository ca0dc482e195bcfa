"""The layers point one way (docs/architecture.md): every import in the source, including the
ones inside functions, checked against the allowed directions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"errors", "leffa", "preprocess", "weightfiles", "evaluation", "training", "cli", "webapp", "app"}
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "weightfiles": {"errors"},
    "leffa": {"errors", "weightfiles"},
    "preprocess": {"errors", "weightfiles"},
    "evaluation": {"errors", "weightfiles"},
    "training": {"errors", "leffa", "preprocess", "weightfiles"},
    "cli": {"errors", "leffa", "preprocess", "evaluation", "training", "weightfiles"},  # leffa infer
    "webapp": {"errors", "leffa", "preprocess", "weightfiles"},
}
ENTRY_POINTS = {Path("leffa/__main__.py"): {"cli"}}  # ``python -m leffa`` runs the CLI application


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    wrong = {}
    for f in files:
        rel = f.relative_to(ROOT)
        bad = imported_packages(f) - {package} - ALLOWED[package] - ENTRY_POINTS.get(rel, set())
        if bad:
            wrong[str(rel)] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef g():\n    from leffa.model import LeffaModel\n    import preprocess.images\n")
    assert imported_packages(f) == {"leffa", "preprocess"}


def test_every_error_a_user_can_fix_is_a_user_error():
    """The app and the CLI show exactly ``UserError``s as messages (anything else is a bug)."""
    from errors import OptionError, UserError
    from preprocess.images import ImageLoadError
    from preprocess.openpose import NoPersonError
    from training.datasets import DatasetError
    from weightfiles.checkpoint import CheckpointError
    from weightfiles.hub import MissingWeightsError

    for cls in (OptionError, ImageLoadError, NoPersonError, DatasetError, CheckpointError, MissingWeightsError):
        assert issubclass(cls, UserError), cls
    assert issubclass(OptionError, ValueError) and issubclass(MissingWeightsError, RuntimeError)
