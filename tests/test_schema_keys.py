"""No key accepted and ignored: every key the schema accepts is read by the code it configures.

The schema (runners/schema.py) is walked leaf by leaf; a key counts as read when the code outside the schema reads
it: as an attribute (``cfg.calib.nsamples``, ``self.blocksize``), a subscript (``config["sweep"]``) or through
``get`` / ``pop`` (``section.get("threads")``), found in the parsed code (comments and docstrings do not count).
A pruner option counts only where its own method's files read it (``self.<option>``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools

import pytest

from pruners import PRUNERS
from runners import schema
from runners.record import method_files

from .conftest import ROOT

PACKAGES = ("runners", "models", "pruners", "evaluators", "corpora", "hydra_plugins")
# read by whom, when the reader is not Python in the packages (one line of why each)
READ_ELSEWHERE = {
    "hydra": "Hydra's own section, read by Hydra",
}


def _names_read(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            names.add(node.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("get", "pop", "setdefault", "select") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.rsplit(".", 1)[-1])
    return names


def _read_in(files) -> set[str]:
    names = set()
    for path in files:
        names |= _names_read(ast.parse(path.read_text()))
    return names


@functools.cache
def _code_reads() -> frozenset:
    return frozenset(_read_in(_code_files()))


def _code_files():
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if "__pycache__" not in p.parts and p != ROOT / "runners" / "schema.py"]


def _leaves(cls, prefix=""):
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _leaves(f.default_factory, key + ".")
        elif f.metadata.get("schema") == "sparsity":
            for kind_schema in {*schema.SPARSITY_SCHEMAS.values(), schema.SparsityBase}:
                yield from (f"sparsity.{leaf}" for leaf in _leaves(kind_schema))
        elif f.metadata.get("schema") == "pruner":
            yield "pruner.name"
        else:
            yield key


SCHEMA_KEYS = sorted(set(_leaves(schema.Config)))


def test_the_walk_sees_the_whole_schema():
    assert {"calib.nsamples", "eval.ppl.max_windows", "sparsity.owl_lambda", "sparsity.n", "report.baseline",
            "speed.threads", "pruner.name"} <= set(SCHEMA_KEYS)


@pytest.mark.parametrize("key", SCHEMA_KEYS)
def test_every_schema_key_is_read_by_the_code(key):
    if key.split(".")[0] in READ_ELSEWHERE:
        return
    assert key.rsplit(".", 1)[-1] in _code_reads(), \
        f"{key}: the schema accepts it but no code reads it (remove it, or make the code honour it)"


@pytest.mark.parametrize("name", sorted(set(PRUNERS) - {"dense"}))
def test_every_pruner_option_is_read_by_its_method(name):
    cls = PRUNERS[name]
    read = _read_in(ROOT / f for f in method_files()[name])
    unread = [f.name for f in dataclasses.fields(cls) if f.name not in read]
    assert not unread, f"pruner={name}: options {unread} are accepted but its method never reads them"


def test_a_key_nothing_reads_is_caught(tmp_path):
    """The check can fail: a field no code reads is reported."""

    @dataclasses.dataclass
    class WithUnread:
        nsamples: int = 1
        owl_gamma_unused_xyz: float = 0.5

    read = _code_reads()
    assert [f.name for f in dataclasses.fields(WithUnread) if f.name not in read] == ["owl_gamma_unused_xyz"]
