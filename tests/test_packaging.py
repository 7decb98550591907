"""Packaging: a non-editable install finds conf/ and the bundled files, and every imported library is declared."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

PACKAGES = ["corpora", "models", "pruners", "evaluators", "runners", "hydra_plugins"]
# import name -> distribution name, where they differ
DIST_OF = {"lm_eval": "lm-eval", "hydra": "hydra-core", "hydra_plugins": None, "yaml": "pyyaml", "mambapy": "mambapy",
           "PIL": "pillow"}


def _third_party_imports() -> set[str]:
    names = set()
    for package in PACKAGES:
        for file in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in PACKAGES and n != "__future__"}


def _requirement_name(requirement: str) -> str:
    for stop in "<>=![; ":
        requirement = requirement.split(stop)[0]
    return requirement.lower()


def test_every_imported_library_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for extra in project["optional-dependencies"].values():
        declared |= {_requirement_name(r) for r in extra}
    missing = {name for name in _third_party_imports()
               if (DIST_OF.get(name, name) or "").replace("_", "-").lower() not in declared | {""}}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(tmp_path):
    """``pip install .`` (a wheel, no source tree on the path) composes the configs and runs the default job."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-m", "runners.run", "eval.ppl.max_windows=4", "calib.nsamples=4",
                           "dense_baseline=false", "wandb.mode=disabled", "progress=false"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    records = list((work / "outputs").rglob("result.json"))
    assert len(records) == 1
    assert str(target) in subprocess.run([sys.executable, "-c", "import runners.validate as v; print(v.CONF_DIR)"],
                                         cwd=work, env=env, capture_output=True, text=True).stdout


def _imports_of(package: str) -> set[str]:
    names = set()
    for file in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
    return names


def test_layering_measuring_and_models_do_not_depend_on_pruning():
    """models/ (adapters, block execution) and evaluators/ (measuring) never import pruners/ or runners/."""
    assert not _imports_of("models") & {"pruners", "evaluators", "runners"}
    assert not _imports_of("evaluators") & {"pruners", "runners"}
