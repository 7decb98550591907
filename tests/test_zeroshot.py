"""Zero-shot evaluation through lm-evaluation-harness on the in-memory model (evaluators/zeroshot.py).

Every number here comes from a real run of lm-eval on a bundled tiny model; the expected values are
computed independently (log-likelihoods by hand) or are statistical bounds (chance = 0.25).
"""

from __future__ import annotations

import json
import math
import shutil
from itertools import islice

import pytest
import torch

from evaluators import zeroshot
from evaluators.tasks import build_tasks
from pruners import Pattern, build_pruner, prune_sequential
from pruners.settings import EngineSettings

from .conftest import load_tiny

LIMIT = 100  # documents per task for the accuracy checks (the tasks have 250)
_RESULTS: dict = {}


def _task_dict():
    if "task_dict" not in _RESULTS:
        _RESULTS["task_dict"] = zeroshot.load_tasks(zeroshot.BUNDLED_TASKS)
    return _RESULTS["task_dict"]


def dense_result(name: str, tasks: tuple[str, ...]) -> dict:
    """evaluate_zeroshot on a fresh dense copy of a bundled model, first LIMIT docs (cached per session)."""
    key = (name, tasks)
    if key not in _RESULTS:
        loaded = load_tiny(name)
        td = _task_dict()
        subset = {"tasks": {t: td["tasks"][t] for t in tasks}, "groups": {}, "group_map": {}}
        _RESULTS[key] = zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, subset, "cpu", limit=LIMIT)
    return _RESULTS[key]


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def docs(task: str, n: int) -> list[dict]:
    with open(zeroshot.BUNDLED_TASKS_DIR / "prunelab" / f"{task}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, n)]


# ---------------------------------------------------------------------------------------------
# bundled tasks
# ---------------------------------------------------------------------------------------------

def test_bundled_task_files_are_what_the_generator_builds():
    assert build_tasks.main(["--check"]) == 0
    for task in zeroshot.BUNDLED_TASKS:
        rows = docs(task, 10_000)
        assert len(rows) == 250
        assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 and len(set(r["choices"])) == 4 for r in rows)
        assert all(r["context"] == r["context"].rstrip() for r in rows)  # lm-eval adds " " + choice


def test_bundled_tasks_load_from_any_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    td = zeroshot.load_tasks(["austen"])  # the group: both tasks
    assert sorted(td["tasks"]) == sorted(zeroshot.BUNDLED_TASKS)
    assert td["group_map"] == {"austen": ["austen_next", "austen_cloze"]}
    for name, task in td["tasks"].items():
        test = list(task.test_docs())
        assert len(test) == 250 and test[0] == {**docs(name, 1)[0]}
    assert not any(tmp_path.iterdir())  # nothing written where we stand


# ---------------------------------------------------------------------------------------------
# names and loading errors
# ---------------------------------------------------------------------------------------------

def test_known_names_pass_the_fast_check():
    zeroshot.check_task_names(zeroshot.WANDA_TASKS + zeroshot.LLM_PRUNER_TASKS + zeroshot.BUNDLED_TASKS
                              + ["austen", "mmlu", "ai2_arc", "lambada_openai", "wikitext"])


@pytest.mark.parametrize("names, expected", [
    (["boolqq"], "unknown lm-eval task 'boolqq' (did you mean boolq?)"),
    (["austen_next", "austen_nxt"], "'austen_nxt' (did you mean austen_next?)"),
    (["no_such_task_anywhere"], "'no_such_task_anywhere'"),
])
def test_unknown_task_names_raise_one_line(names, expected):
    with pytest.raises(ValueError) as err:
        zeroshot.check_task_names(names)
    message = str(err.value)
    assert expected in message and message.startswith("eval.zeroshot.tasks:") and "\n" not in message
    with pytest.raises(ValueError, match=names[-1]):
        zeroshot.load_tasks(names)


def test_custom_include_path_is_indexed(tmp_path):
    task = (zeroshot.BUNDLED_TASKS_DIR / "prunelab" / "austen_cloze.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(task.replace("task: austen_cloze", "task: my_cloze")
                                        .replace("!function austen_data.", "!function copied.")
)
    shutil.copy(zeroshot.BUNDLED_TASKS_DIR / "prunelab" / "austen_data.py", tmp_path / "copied.py")
    shutil.copy(zeroshot.BUNDLED_TASKS_DIR / "prunelab" / "austen_cloze.jsonl", tmp_path / "austen_cloze.jsonl")
    with pytest.raises(ValueError, match="my_cloze"):
        zeroshot.check_task_names(["my_cloze"])
    zeroshot.check_task_names(["my_cloze"], include_path=str(tmp_path))
    td = zeroshot.load_tasks(["my_cloze"], include_path=[str(tmp_path)])
    assert len(list(td["tasks"]["my_cloze"].test_docs())) == 250
    with pytest.raises(ValueError, match="include_path"):
        zeroshot.check_task_names(["my_cloze"], include_path=str(tmp_path / "missing"))


def _offline_datasets() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE)


def test_hub_task_fails_fast_and_clearly_offline(tmp_path):
    """lm-eval's own boolq YAML (dataset aps/super_glue) is indexed from a small folder (no 15-25 s
    index of all built-in tasks); loading it offline must fail with one line naming the task."""
    if not _offline_datasets():
        pytest.skip("needs HF_DATASETS_OFFLINE / HF_HUB_OFFLINE")
    boolq = zeroshot._lm_eval_tasks_dir() / "super_glue" / "boolq" / "default.yaml"
    shutil.copy(boolq, tmp_path / "boolq.yaml")
    try:
        zeroshot.load_tasks(["austen_cloze", "boolq"], include_path=str(tmp_path))
    except ValueError as err:
        message = str(err)
    else:
        pytest.skip("aps/super_glue is in the local datasets cache")
    assert "'boolq'" in message and "aps/super_glue" in message and "offline" in message and "\n" not in message


@pytest.mark.slow
def test_hub_task_through_the_full_index_fails_clearly_offline():
    if not _offline_datasets():
        pytest.skip("needs HF_DATASETS_OFFLINE / HF_HUB_OFFLINE")
    with pytest.raises(ValueError, match=r"task 'hellaswag' cannot be loaded offline: dataset Rowan/hellaswag"):
        zeroshot.load_tasks(["hellaswag"])


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def _hand_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log-probabilities of the tokens of " " + choice given the context.

    One right-padded batch of the choices (a causal model's logits at a position do not depend on the
    padding after it); logits only from the last context position on (``logits_to_keep``).
    """
    ctx = tokenizer(context)["input_ids"]
    wholes = [tokenizer(context + " " + choice)["input_ids"] for choice in choices]
    assert all(w[:len(ctx)] == ctx and len(w) > len(ctx) for w in wholes)
    width = max(len(w) for w in wholes) - 1
    batch = torch.tensor([w[:-1] + [0] * (width - len(w) + 1) for w in wholes])
    with torch.no_grad():
        logits = model(batch, logits_to_keep=width - len(ctx) + 1).logits  # positions len(ctx)-1 ... width-1
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    out = []
    for row, whole in zip(logprobs, wholes, strict=True):
        cont = torch.tensor(whole[len(ctx):])
        out.append(row[:len(cont)].gather(1, cont[:, None]).sum().item())
    return out


def hand_scores(model, tokenizer, rows: list[dict]) -> tuple[float, float, float]:
    """(acc, acc_norm, smallest gap between two choices' log-likelihoods) over ``rows``."""
    acc = acc_norm = 0
    margin = math.inf
    for doc in rows:
        lls = _hand_loglikelihoods(model, tokenizer, doc["context"], doc["choices"])
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]  # lm-eval: len(choice)
        acc += max(range(4), key=lambda i: lls[i]) == doc["label"]
        acc_norm += max(range(4), key=lambda i: norm[i]) == doc["label"]
        margin = min(margin, *(abs(a - b) for i, a in enumerate(lls) for b in lls[i + 1:]))
    return acc / len(rows), acc_norm / len(rows), margin


def test_accuracy_equals_hand_computation_from_loglikelihoods():
    result = dense_result("tiny-llama", ("austen_next", "austen_cloze"))
    loaded = load_tiny("tiny-llama")
    for task in ("austen_next", "austen_cloze"):
        acc, acc_norm, margin = hand_scores(loaded.model, loaded.tokenizer, docs(task, LIMIT))
        assert margin > 1e-4  # no near-ties that batching noise could flip
        got = result["tasks"][task]
        assert got["samples"] == LIMIT
        assert got["acc"] == pytest.approx(acc, abs=1e-12)
        assert got["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
        for metric in ("acc", "acc_norm"):  # analytic standard error of a mean of 0/1 scores
            p = got[metric]
            assert got[f"{metric}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)), rel=1e-9)


def test_result_is_json_and_carries_versions():
    import lm_eval

    result = dense_result("tiny-llama", ("austen_next", "austen_cloze"))
    assert json.loads(json.dumps(result)) == result
    assert result["lm_eval_version"] == lm_eval.__version__
    assert result["limit"] == LIMIT and result["num_fewshot"] == 0
    assert result["batch_size"] == {"requested": "auto", "used": zeroshot.CPU_AUTO_BATCH_SIZE}
    for task in ("austen_next", "austen_cloze"):
        entry = result["tasks"][task]
        assert entry["version"] == 1.0 and entry["num_fewshot"] == 0
        assert all(isinstance(entry[k], float) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"))
    tasks = result["tasks"].values()
    assert result["average"]["acc"] == pytest.approx(sum(t["acc"] for t in tasks) / 2)
    assert result["average"]["acc_norm"] == pytest.approx(sum(t["acc_norm"] for t in tasks) / 2)


@pytest.mark.parametrize("name, task", [("tiny-llama", "austen_next"), ("tiny-llama", "austen_cloze"),
                                        ("tiny-opt", "austen_cloze"), ("tiny-mamba", "austen_cloze")])
def test_trained_tiny_models_beat_chance(name, task):
    tasks = ("austen_next", "austen_cloze") if name == "tiny-llama" else (task,)
    acc = dense_result(name, tasks)["tasks"][task]["acc"]
    assert binomial_tail(round(acc * LIMIT), LIMIT, 0.25) < 1e-4, acc


def test_ninety_percent_magnitude_pruning_scores_lower():
    dense = dense_result("tiny-llama", ("austen_next", "austen_cloze"))
    loaded = load_tiny("tiny-llama")
    prune_sequential(loaded.model, loaded.adapter, build_pruner({"name": "magnitude"}), Pattern("unstructured", 0.9),
                     None, EngineSettings(progress=False))
    pruned = zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, _task_dict(), "cpu", limit=LIMIT)
    # measured: dense 0.49 / 0.72, pruned 0.29 / 0.53 (acc, next / cloze, first 100 docs)
    for task in ("austen_next", "austen_cloze"):
        assert pruned["tasks"][task]["acc"] < dense["tasks"][task]["acc"] - 0.1
    assert pruned["average"]["acc"] < dense["average"]["acc"] - 0.1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mamba"])
def test_model_is_left_as_it_was(name):
    loaded = load_tiny(name)
    model = loaded.model
    model.train()
    model.config.use_cache = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = zeroshot.evaluate_zeroshot(model, loaded.tokenizer, ["austen_cloze"], "cpu", batch_size=4, limit=8)
    assert result["tasks"]["austen_cloze"]["samples"] == 8 and result["batch_size"]["used"] == 4
    assert model.training and model.config.use_cache is True
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert next(model.parameters()).device.type == "cpu"


def test_batch_size_and_fewshot_are_passed_through():
    loaded = load_tiny("tiny-opt")
    td = zeroshot.load_tasks(["austen_cloze"], num_fewshot=1)
    one = zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, td, "cpu", batch_size=3, limit=6, num_fewshot=1)
    assert one["tasks"]["austen_cloze"]["num_fewshot"] == 1 and one["num_fewshot"] == 1
    # the same loaded tasks, back to 0-shot
    zero = zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, td, "cpu", batch_size=5, limit=6, num_fewshot=0)
    assert zero["tasks"]["austen_cloze"]["num_fewshot"] == 0 and zero["batch_size"]["used"] == 5
    acc, acc_norm, _ = hand_scores(loaded.model, loaded.tokenizer, docs("austen_cloze", 6))
    assert (zero["tasks"]["austen_cloze"]["acc"], zero["tasks"]["austen_cloze"]["acc_norm"]) == pytest.approx((acc, acc_norm))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mamba"])
def test_cuda_matches_cpu(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    loaded = load_tiny(name)  # fp32, on the CPU: moved to the GPU for the evaluation and back
    results = {d: zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, ["austen_cloze"], d, limit=40)
               for d in ("cpu", "cuda")}
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert results["cuda"]["device"].startswith("cuda")
    assert results["cuda"]["tasks"]["austen_cloze"]["acc"] == pytest.approx(
        results["cpu"]["tasks"]["austen_cloze"]["acc"], abs=0.03)


def test_lm_eval_command_line_reads_a_gpt2_saved_in_its_own_conv1d_layout():
    """eval.zeroshot.backend=cli saves the model for `lm_eval --model hf`: GPT-2's projections (nn.Linear inside
    PruneLab) are written back in Conv1D layout, so lm-eval's own loading reproduces the in-memory accuracies."""
    loaded = load_tiny("tiny-gpt2")
    td = _task_dict()
    subset = {"tasks": {"austen_next": td["tasks"]["austen_next"]}, "groups": {}, "group_map": {}}
    memory = zeroshot.evaluate_zeroshot(loaded.model, loaded.tokenizer, subset, "cpu", limit=24, batch_size=8)
    cli = zeroshot.evaluate_zeroshot_cli(loaded.model, loaded.tokenizer, ["austen_next"], "cpu", limit=24,
                                         batch_size=8, native_state=loaded.adapter.native_state)
    assert cli["tasks"]["austen_next"]["acc"] == pytest.approx(memory["tasks"]["austen_next"]["acc"])
