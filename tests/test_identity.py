"""Run identity: the scoped code fingerprint (runners.record.code_fingerprint) in a copy of the source tree."""

import shutil

import pytest

from runners import record
from runners.record import SHARED_CODE, code_fingerprint

from .conftest import ROOT

METHODS = ("dense", "magnitude", "sparsegpt", "flap")


@pytest.fixture
def tree(tmp_path):
    for entry in SHARED_CODE:
        src, dst = ROOT / entry, tmp_path / entry
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return tmp_path


def fingerprints(root):
    code_fingerprint.cache_clear()
    return {m: code_fingerprint(m, root) for m in METHODS}


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_copy_fingerprints_like_the_checkout(tree):
    assert fingerprints(tree) == fingerprints(None)
    assert len(set(fingerprints(tree).values())) == len(METHODS)


def test_editing_one_method_file_changes_that_method_only(tree):
    before = fingerprints(tree)
    (tree / "pruners" / "flap.py").write_text((tree / "pruners" / "flap.py").read_text() + "\nFLAP_EXTRA = 1\n")
    after = fingerprints(tree)
    assert after["flap"] != before["flap"]
    assert {m: after[m] for m in ("dense", "magnitude", "sparsegpt")} == \
        {m: before[m] for m in ("dense", "magnitude", "sparsegpt")}


def test_base_class_modules_count_for_their_methods():
    files = record.method_files()
    assert "pruners/sparsegpt.py" in files["sparsegpt"] and "pruners/base.py" in files["sparsegpt"]
    assert "pruners/structured.py" in files["flap"] and files["dense"] == ()
    shared = record.fingerprint_files("dense")
    assert not {"pruners/flap.py", "pruners/sparsegpt.py", "pruners/magnitude.py", "pruners/dense.py"} & set(shared)
    assert "models/train_tiny.py" not in shared and "corpora/build_corpus.py" not in shared
    assert "evaluators/tasks/build_tasks.py" not in shared and "pruners/masks.py" in shared


def test_docstrings_comments_and_scripts_change_no_fingerprint(tree):
    before = fingerprints(tree)
    masks = tree / "pruners" / "masks.py"
    text = masks.read_text()
    start = text.index('"""') + 3
    masks.write_text(text[:start] + "An edited module docstring. " + text[start:] + "\n# a new comment\n")
    flap = tree / "pruners" / "flap.py"
    flap.write_text("# a leading comment\n" + flap.read_text())
    (tree / "models" / "train_tiny.py").write_text((tree / "models" / "train_tiny.py").read_text() + "\nX = 2\n")
    (tree / "models" / "tiny" / "tiny-opt" / "README.md").write_text("edited docs\n")
    assert fingerprints(tree) == before


def test_editing_code_in_a_shared_file_changes_every_fingerprint(tree):
    before = fingerprints(tree)
    masks = tree / "pruners" / "masks.py"
    masks.write_text(masks.read_text() + "\nMASKS_EXTRA = 1\n")
    after = fingerprints(tree)
    assert all(after[m] != before[m] for m in METHODS)


def test_run_ids_follow_the_fingerprint(monkeypatch):
    from omegaconf import OmegaConf

    from .conftest import compose

    config = OmegaConf.to_container(compose(), resolve=True)
    base = record.run_id(config)
    monkeypatch.setattr(record, "source_digest", lambda: "1" * 12)  # the whole-tree digest is provenance only
    assert record.run_id(config) == base
    monkeypatch.setattr(record, "code_fingerprint", lambda name: "0" * 12)
    assert record.run_id(config) != base


def prune_fingerprints(root):
    record.prune_fingerprint.cache_clear()
    return {m: record.prune_fingerprint(m, root) for m in METHODS if m != "dense"}


def test_the_prune_fingerprint_covers_the_pruning_code_only(tree):
    shared = record.fingerprint_files("sparsegpt", shared=record.PRUNE_CODE)
    assert "runners/pruning.py" in shared and "pruners/masks.py" in shared and "pruners/sparsegpt.py" in shared
    assert not [f for f in shared if f.startswith("evaluators/") or f == "runners/run.py"]
    before, runs = prune_fingerprints(tree), fingerprints(tree)
    # an evaluator or the runner's evaluation / records: new run ids, the same pruned weights
    for rel in ("evaluators/ppl.py", "runners/run.py"):
        (tree / rel).write_text((tree / rel).read_text() + "\nEVAL_EXTRA = 1\n")
    assert prune_fingerprints(tree) == before
    assert all(fingerprints(tree)[m] != runs[m] for m in METHODS)
    # the prune step, shared pruning code, or one method's file
    (tree / "runners" / "pruning.py").write_text((tree / "runners" / "pruning.py").read_text() + "\nPRUNE_EXTRA = 1\n")
    after = prune_fingerprints(tree)
    assert all(after[m] != before[m] for m in after)
    (tree / "pruners" / "flap.py").write_text((tree / "pruners" / "flap.py").read_text() + "\nFLAP_EXTRA = 1\n")
    last = prune_fingerprints(tree)
    assert last["flap"] != after["flap"] and {m: last[m] for m in ("magnitude", "sparsegpt")} == \
        {m: after[m] for m in ("magnitude", "sparsegpt")}


def test_prune_ids_follow_the_prune_fingerprint_and_run_ids_ignore_the_cache_keys(monkeypatch):
    from omegaconf import OmegaConf

    from .conftest import compose

    config = OmegaConf.to_container(compose(), resolve=True)
    rid, pid = record.run_id(config), record.prune_id(config)
    for override in ("cache_pruned=never", "cache_pruned_max_params=7"):
        assert record.run_id(OmegaConf.to_container(compose(override), resolve=True)) == rid, override
    monkeypatch.setattr(record, "prune_fingerprint", lambda name: "0" * 12)
    assert record.prune_id(config) != pid and record.run_id(config) == rid
