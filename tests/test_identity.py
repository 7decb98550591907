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


TOY_METHOD = '''
from dataclasses import dataclass

from .base import ScoreMaskPruner, register
from .stats import ColumnSquares


@register
@dataclass
class Toy(ScoreMaskPruner):
    name = "toy"
    statistic = ColumnSquares
    needs_calibration = True
    group: str = "row"

    def score(self, weight, stat):
        return weight.abs() * stat.norm.unsqueeze(0)
'''
IDS = ("import json; from pruners import PRUNERS; from runners.record import run_id; "
       "config = lambda m: {'model': {'name': 'm', 'dtype': 'auto'}, 'pruner': {'name': m}, 'device': 'auto', "
       "'sparsity': {'kind': 'unstructured', 'ratio': 0.5}, 'seed': 0}; "
       "ident = {'resolved': {'device': 'cpu'}, 'checkpoint': {}, 'data': {}, 'versions': {}}; "
       "print(json.dumps({m: run_id(config(m), prunes=m != 'dense', identity=ident) for m in sorted(PRUNERS)}))")


def test_adding_a_method_file_leaves_every_other_run_id_unchanged(tmp_path):
    """The registry is filled by the method files themselves (@register): a new method file edits no shared file."""
    import json
    import os
    import subprocess
    import sys

    for entry in ("pruners", "models", "corpora", "evaluators", "runners", "conf"):
        shutil.copytree(ROOT / entry, tmp_path / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def ids():
        out = subprocess.run([sys.executable, "-c", IDS], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    before = ids()
    (tmp_path / "pruners" / "toy.py").write_text(TOY_METHOD)
    after = ids()
    assert "toy" in after and "toy" not in before
    assert {m: after[m] for m in before} == before


def _ids(*overrides, device=None):
    """(run id, prune id, identity) of a composed config as execute computes them (``device``: a resolved device
    in place of this machine's, e.g. a simulated cuda)."""
    from omegaconf import OmegaConf

    from runners.identity import run_identity
    from runners.validate import validate

    from .conftest import compose

    cfg = compose("model=tiny-opt", "pruner=wanda", *overrides)
    plan = validate(cfg)
    if device is not None:
        plan.device = device
    ident = run_identity(cfg, plan)
    config = OmegaConf.to_container(cfg, resolve=True)
    return (record.run_id(config, calibrates=plan.calibrates, identity=ident),
            record.prune_id(config, calibrates=plan.calibrates, identity=ident), ident)


def test_every_auto_is_resolved_before_it_is_hashed():
    rid, pid, ident = _ids()
    assert ident["resolved"] == {"device": "cpu", "dtype": "float32", "attn_implementation": "sdpa"}
    # the same experiment spelled out: the same ids
    assert _ids("device=cpu", "model.dtype=float32")[:2] == (rid, pid)
    # another resolved dtype (auto on a CUDA device is float16; bfloat16 on this CPU): other ids
    gpu = _ids(device="cuda")
    assert gpu[2]["resolved"]["dtype"] == "float16" and gpu[2]["resolved"]["device"] == "cuda"
    assert gpu[0] != rid and gpu[1] != pid
    assert _ids("model.dtype=bfloat16")[0] != rid
    assert _ids(device="cuda:1")[0] == gpu[0]  # the device index changes no number
    # the attention implementation transformers really uses
    eager = _ids("model.attn_implementation=eager")
    assert eager[2]["resolved"]["attn_implementation"] == "eager" and eager[0] != rid
    assert _ids("model.attn_implementation=null")[2]["resolved"]["attn_implementation"] == "sdpa"


def test_checkpoint_and_data_content_enter_the_id(tmp_path):
    """A copy of the checkpoint with one weight changed, or a calibration text with one more line: other ids;
    an identical copy elsewhere: the same checkpoint identity (its content)."""
    import json

    from safetensors.torch import load_file, save_file

    src = ROOT / "models" / "tiny" / "tiny-opt"
    same, changed = tmp_path / "same", tmp_path / "changed"
    shutil.copytree(src, same)
    shutil.copytree(src, changed)
    weights = load_file(changed / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    local = ("model=local", "model.name=tiny-opt", "model.seqlen=256", "model.attn_implementation=sdpa")
    a = _ids(*local, f"model.path={same}")
    b = _ids(*local, f"model.path={changed}")
    assert a[2]["checkpoint"]["sha256"] != b[2]["checkpoint"]["sha256"] and a[0] != b[0] and a[1] != b[1]
    assert a[2]["checkpoint"] == _ids()[2]["checkpoint"]  # the bundled one: the same bytes
    text = tmp_path / "calib.txt"
    text.write_text((ROOT / "corpora" / "austen" / "train.txt").read_text()[:200000])
    c = _ids("calib.source=text", f"calib.path={text}")
    text.write_text(text.read_text() + "\nOne more line.\n")
    d = _ids("calib.source=text", f"calib.path={text}")
    assert c[2]["data"]["calib"] != d[2]["data"]["calib"] and c[0] != d[0] and c[1] != d[1]
    assert json.dumps(c[2]["data"]["eval/bundled"]) == json.dumps(d[2]["data"]["eval/bundled"])


def test_library_versions_enter_the_id(monkeypatch):
    rid, pid, ident = _ids()
    assert set(ident["versions"]) >= {"torch", "transformers", "tokenizers"}
    real = record.metadata.version
    monkeypatch.setattr(record.metadata, "version", lambda name: "0.0.1" if name == "torch" else real(name))
    assert _ids()[:2] != (rid, pid)


def test_one_config_in_float32_and_bfloat16_gives_two_ids_and_two_records(tmp_path):
    from runners.run import execute

    from .conftest import compose

    common = ("model=tiny-opt", "pruner=magnitude", "eval.ppl.max_windows=2", "device=cpu", f"output_root={tmp_path}", "sweep=s",
              "progress=false", "wandb.mode=disabled", "dense_baseline=false", "cache_pruned=never")
    fp32 = execute(compose(*common, "model.dtype=float32"))
    bf16 = execute(compose(*common, "model.dtype=bfloat16"))
    assert fp32["run_id"] != bf16["run_id"]
    assert (fp32["identity"]["resolved"]["dtype"], bf16["identity"]["resolved"]["dtype"]) == ("float32", "bfloat16")
    assert len(list((tmp_path / "s").glob("*/result.json"))) == 2
    # model.dtype=auto on the CPU is float32: the same experiment, already recorded
    again = execute(compose(*common, "model.dtype=auto"))
    assert again["status"] == "skipped" and again["run_id"] == fp32["run_id"]
