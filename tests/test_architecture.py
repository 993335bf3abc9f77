"""The library's layout: the science in `ddpm/` imports nothing of the run-folder machinery (`ddpm.pipeline`) or
of the orchestration (`flows/`, Prefect, Ray, MLflow), and the machinery nothing of the orchestration; every
module says what it owns in its first lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("flows", "prefect", "ray", "mlflow")
SCIENCE = sorted(p for p in (REPO / "ddpm").rglob("*.py") if "pipeline" not in p.relative_to(REPO / "ddpm").parts)
PIPELINE = sorted((REPO / "ddpm" / "pipeline").rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside a function (a lazy import is a dependency too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("path", SCIENCE, ids=module_name)
def test_science_imports_neither_the_pipeline_nor_the_orchestration(path):
    found = {n for n in imported(path) if under(n, ("ddpm.pipeline", *ORCHESTRATION))}
    assert not found, f"{module_name(path)} imports {sorted(found)}"


@pytest.mark.parametrize("path", PIPELINE, ids=module_name)
def test_pipeline_imports_no_orchestration(path):
    found = {n for n in imported(path) if under(n, ORCHESTRATION)}
    assert not found, f"{module_name(path)} imports {sorted(found)}"


def test_importing_the_science_loads_none_of_the_rest():
    """The same at run time, in a fresh interpreter: every science module imported, and not one module of the
    pipeline or the orchestration came with them (indirectly either)."""
    code = "\n".join([
        "import importlib, sys",
        *(f"importlib.import_module({module_name(p)!r})" for p in SCIENCE),
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {ORCHESTRATION!r}"
        " or m.startswith('ddpm.pipeline')))",
    ])
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("path", SCIENCE + PIPELINE + sorted((REPO / "flows").glob("*.py")), ids=module_name)
def test_every_module_says_what_it_owns(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree)
    assert doc and len(doc) > 30, f"{module_name(path)} has no docstring saying what it owns"


@pytest.mark.parametrize("path", SCIENCE + PIPELINE, ids=module_name)
def test_modules_stay_a_size_a_reader_holds(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 500, f"{module_name(path)} has {lines} lines: split it where its parts own different things"


def test_the_config_and_the_cli_load_without_torch():
    """Every `ddpm` command reads its config before any work, and a refusal is its whole run: importing torch
    there (2 s) would make a 0.1 s answer twenty times slower."""
    code = "import sys, ddpm.config, ddpm.schema, flows.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
