"""The layers point one way (docs/architecture.md): every import in the source, including the
ones inside functions, checked against the allowed directions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"errors", "weightfiles", "runtime", "leffa", "mcld", "preprocess", "evaluation", "engine", "training", "cli", "webapp",
        "app"}
BOTTOM = {"errors", "weightfiles"}
LIBRARIES = {"leffa", "mcld", "preprocess", "evaluation"}  # side by side: none imports another
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "weightfiles": {"errors"},
    "runtime": BOTTOM,
    **{library: BOTTOM | {"runtime"} for library in LIBRARIES},
    "engine": BOTTOM | {"runtime"} | LIBRARIES,  # the one layer that may import every library
    # applications: the engine and below
    "training": BOTTOM | {"runtime", "engine"} | LIBRARIES,
    "cli": BOTTOM | {"runtime", "engine", "training"} | LIBRARIES,  # training: leffa infer
    "webapp": BOTTOM | {"runtime", "engine"} | LIBRARIES,
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


def test_libraries_import_no_sibling_and_applications_no_other_application():
    for library in LIBRARIES:
        assert not ALLOWED[library] & (LIBRARIES | {"engine", "training", "cli", "webapp"}), library
    assert not ALLOWED["webapp"] & {"cli", "training"} and not ALLOWED["training"] & {"cli", "webapp"}


def test_the_bottom_layer_knows_no_model_names():
    """``weightfiles/`` finds, downloads, checks and reports files: the libraries declare theirs."""
    from engine.registry import WeightSet

    names = {f.path for f in WeightSet.ALL.files} | {f.repo for f in WeightSet.ALL.files}
    for f in sorted((ROOT / "weightfiles").rglob("*.py")):
        text = f.read_text()
        assert not [name for name in names if name in text], f


def test_the_registry_and_the_option_checks_import_no_torch():
    """What the command line's parser and the app's settings read imports without torch."""
    import subprocess
    import sys

    code = ("import sys, engine.registry, engine.options, engine.weights, cli.main, webapp.settings; "
            "print(sorted(m for m in ('torch', 'diffusers', 'gradio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


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
