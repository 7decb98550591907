"""Zero-shot (and few-shot) multiple-choice accuracy through lm-evaluation-harness, on the in-memory model.

The pruned model is evaluated as it sits in memory: it is wrapped in lm-eval's ``HFLM``
(``pretrained=<PreTrainedModel>``), nothing is written to disk, and ``lm_eval.evaluator.evaluate``
scores the tasks exactly as ``lm_eval --model hf`` does on a checkpoint. :func:`evaluate_zeroshot_cli`
(``eval.zeroshot.backend=cli``) runs that command itself on the model saved to a temporary folder;
``+experiment=bench-zeroshot`` runs both and its report puts their accuracies and times side by side.

- :func:`check_task_names`: cheap, for config validation (no lm-eval import; ~1 s the first time).
- :func:`load_tasks`: builds lm-eval's task dict, which loads the datasets; the runner calls it
  *before* loading the model so that a hub task that is not available offline fails first.
- :func:`evaluate_zeroshot`: runs the tasks and returns a JSON-serialisable summary;
- :func:`evaluate_zeroshot_cli`: the same summary from lm-eval's command line on a saved copy.

Bundled offline tasks (``evaluators/tasks/prunelab``, built from the bundled test split by
``python -m evaluators.tasks.build_tasks``; 250 items, 4 choices each):

- ``austen_next``: pick the true last 2-4 words of a sentence of Persuasion (HellaSwag-style endings);
- ``austen_cloze``: pick the sentence's true last word among 4 words of similar frequency;
- ``austen``: the group of both (its acc / acc_norm are the unweighted means).

Numbers are fractions in [0, 1], as lm-eval reports them. ``acc`` picks the choice with the highest
summed log-likelihood of its tokens given the context (the continuation is ``" " + choice``);
``acc_norm`` divides that log-likelihood by the choice's length in characters (lm-eval 0.4.13's
``len(choice)``; the bundled text is ASCII, so characters = bytes). Their ``*_stderr`` is lm-eval's
analytic standard error of a mean (sample standard deviation / sqrt(n)); lm-eval bootstraps only
other metrics (perplexity, f1, bleu, ...), so ``bootstrap_iters`` merely has to be > 0 (0 disables
every stderr).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import io
import logging
import math
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from models.blocks import on_device

BUNDLED_TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_TASKS = ["austen_next", "austen_cloze"]

# Task suites of the papers (lm-eval names; their datasets come from the Hugging Face hub)
WANDA_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
LLM_PRUNER_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
SUITES = {"bundled": BUNDLED_TASKS, "wanda": WANDA_TASKS, "llm-pruner": LLM_PRUNER_TASKS}

# On CPU lm-eval's batch_size="auto" runs 5 forward passes of max_batch_size x the longest request to
# find a size that does not run out of memory, which on CPU it never does: it always picks
# max_batch_size, and bigger batches are slower there (measured on the tiny models: 8 fastest, 64
# 1.5-1.8x slower). So "auto" means this fixed size on CPU and lm-eval's detection on CUDA.
CPU_AUTO_BATCH_SIZE = 8
KEY = "eval.zeroshot.tasks"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# task names
# ---------------------------------------------------------------------------------------------

def _paths(include_path: str | os.PathLike | Iterable | None) -> list[str]:
    """The user's include paths as absolute strings (a str/path or any iterable of them, e.g. a ListConfig)."""
    if include_path is None:
        return []
    items = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    out = []
    for item in items:
        path = Path(str(item)).expanduser()
        if not path.is_dir():
            raise ValueError(f"eval.zeroshot.include_path={item}: no such directory")
        out.append(str(path.resolve()))
    return out


def _include_paths(include_path) -> tuple[str, ...]:
    paths = [str(BUNDLED_TASKS_DIR)] + _paths(include_path)
    return tuple(dict.fromkeys(paths))  # unique, in order


def _names(tasks) -> list[str]:
    items = [tasks] if isinstance(tasks, str) else list(tasks or [])
    names = [str(t).strip() for t in items]
    if not names or not all(names):
        raise ValueError(f"{KEY}: no task given (lm-eval task names, e.g. {', '.join(BUNDLED_TASKS)})")
    return names


@functools.lru_cache(maxsize=8)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    with quiet():
        return TaskManager(include_path=list(paths), include_defaults=defaults)


def task_manager(include_path: str | list[str] | None = None, *, defaults: bool = True):
    """A cached ``lm_eval.tasks.TaskManager`` whose include_path is BUNDLED_TASKS_DIR + ``include_path``.

    ``defaults=True`` also indexes lm-eval's ~14,000 built-in task YAMLs, which takes 15-30 s on a
    2-core CPU (once per process and include_path); ``defaults=False`` indexes only the bundled and the
    user's folders (milliseconds).
    """
    return _task_manager(_include_paths(include_path), defaults)


def _lm_eval_tasks_dir() -> Path | None:
    spec = importlib.util.find_spec("lm_eval")  # located, not imported (lm-eval imports datasets, torch, ...)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


_KEY_LINE = re.compile(r"""^["']?(task|group|tag)["']?[ \t]*:[ \t]*(.*)$""")
_LIST_ITEM = re.compile(r"^[ \t]+-[ \t]+(.+)$")
_IGNORED = {"__pycache__", ".ipynb_checkpoints"}


def _unquote(value: str) -> str:
    value = value.split(" #", 1)[0].strip()
    return value.strip("\"'").strip()


def _scan_text(text: str, names: set[str]) -> None:
    """Add the values of top-level ``task:`` / ``group:`` / ``tag:`` keys (scalars, flow or block lists)."""
    in_list = False
    for line in text.splitlines():
        if in_list:
            item = _LIST_ITEM.match(line)
            if item:
                if ": " not in item.group(1):  # not an inline task dict
                    names.add(_unquote(item.group(1)))
                continue
            in_list = False
        m = _KEY_LINE.match(line)
        if not m:
            continue
        value = _unquote(m.group(2))
        if value.startswith("["):
            names.update(_unquote(v) for v in value.strip("[]").split(",") if _unquote(v))
        elif value and not value.startswith(("!", "{")):
            names.add(value)
        elif not value:
            in_list = True


def _mentioned(name: str, text: str) -> bool:
    """Whether ``name`` occurs in ``text`` as a whole name (not inside a longer one)."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text) is not None


_INCLUDE_LINE = re.compile(r"""^["']?include["']?[ \t]*:[ \t]*(.+)$""", re.M)


@functools.lru_cache(maxsize=32)
def _scan_root(root: str) -> tuple[frozenset[str], str]:
    """(names declared, all text) of the ``*.yaml`` files under ``root`` and the templates they include.

    This is what lm-eval's index reads (``**/*.yaml``, ``include:`` resolved next to the file), scanned
    as text rather than parsed: 14,000 files in about 1-3 s instead of lm-eval's 15-30 s.
    """
    names: set[str] = set()
    texts = []
    todo = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED)
        todo += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".yaml")]
    seen: set[str] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:  # a missing include: lm-eval skips that file too
            continue
        texts.append(text)
        _scan_text(text, names)
        for m in _INCLUDE_LINE.finditer(text):
            todo.append(os.path.normpath(os.path.join(os.path.dirname(path), _unquote(m.group(1)))))
    return frozenset(names), "\n".join(texts)


def _quick_index(include_path) -> tuple[set[str], str]:
    """Names declared in YAML files (lm-eval's built-ins, the bundled and the user's folders), and their text."""
    names: set[str] = set()
    texts = []
    fixed = [_lm_eval_tasks_dir(), BUNDLED_TASKS_DIR]  # scanned once per process
    for root in fixed + [Path(p) for p in _paths(include_path)]:
        if root is None or not root.is_dir():
            continue
        scan = _scan_root if root in fixed else _scan_root.__wrapped__  # the user's folders: every time
        found, text = scan(str(root))
        names |= found
        texts.append(text)
    return names, "\n".join(texts)


def _unknown_message(unknown: list[str], known: Iterable[str]) -> str:
    known = sorted(set(known))
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        parts.append(f"'{name}'" + (f" (did you mean {close[0]}?)" if close else ""))
    what = "task" if len(unknown) == 1 else "tasks"
    hint = "" if any("did you mean" in p for p in parts) else \
        " (custom tasks need eval.zeroshot.include_path=<folder with their YAML>)"
    return f"{KEY}: unknown lm-eval {what} {', '.join(parts)}{hint}"


def check_task_names(tasks, include_path: str | list[str] | None = None) -> None:
    """Raise ``ValueError`` (one line) naming every task, group or tag that lm-eval does not know.

    Fast path, no lm-eval import (about 1 s the first time in a process, cached after): the names
    declared by ``task:`` / ``group:`` / ``tag:`` in lm-eval's task YAMLs, the bundled tasks and the
    user's ``include_path``. A name no YAML file even contains is unknown for sure; the rare name that
    appears somewhere without being found (e.g. declared in an unusual way) is settled by lm-eval's own
    index (:func:`task_manager`, 15-30 s once). An existing ``.yaml`` file path is accepted as lm-eval does.
    """
    names = _names(tasks)
    declared, text = _quick_index(include_path)
    missing = [n for n in names if n not in declared and not (n.endswith(".yaml") and Path(n).is_file())]
    if not missing:
        return
    unknown = [n for n in missing if not _mentioned(n, text)]
    maybe = [n for n in missing if n not in unknown]
    known: Iterable[str] = declared
    if maybe:
        index = task_manager(include_path).all_tasks
        unknown += [n for n in maybe if n not in index]
        known = index
    if unknown:
        raise ValueError(_unknown_message(sorted(unknown, key=names.index), known))


# ---------------------------------------------------------------------------------------------
# loading tasks (datasets)
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet(progress: bool = False):
    """Keep lm-eval's chatter down: its loggers at ERROR and, unless ``progress``, its prints and
    progress bars (written to sys.stdout / sys.stderr; logging handlers keep their own streams)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if progress:
            yield
        else:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                yield
    finally:
        logger.setLevel(level)


def _offline() -> bool:
    flags = (os.environ.get("HF_DATASETS_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _load_error(name: str, err: BaseException, manager) -> ValueError:
    """One line naming the task and why it could not be loaded."""
    entry = manager.task_index.get(name) if manager is not None else None
    cfg = (entry.cfg or {}) if entry is not None else {}
    dataset = cfg.get("dataset_path")
    if cfg.get("dataset_name"):
        dataset = f"{dataset} ({cfg['dataset_name']})"
    chain, cause = [], err
    while cause is not None and len(chain) < 6:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(f"{type(c).__name__}: {c}" for c in chain)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    network = any(isinstance(c, (ConnectionError, TimeoutError)) for c in chain) or any(
        key in text for key in ("OfflineModeIsEnabled", "is not cached", "Couldn't reach", "offline mode"))
    if isinstance(err, KeyError) and "not a registered task" in text:
        return ValueError(_unknown_message([name], manager.all_tasks if manager is not None else []))
    if network:
        where = f"dataset {dataset}" if dataset else "its dataset"
        if _offline():
            return ValueError(f"{KEY}: lm-eval task '{name}' cannot be loaded offline: {where} is not in the local "
                              f"Hugging Face datasets cache (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set; {first})")
        return ValueError(f"{KEY}: lm-eval task '{name}' cannot be loaded: {where} could not be downloaded ({first})")
    return ValueError(f"{KEY}: lm-eval task '{name}' cannot be loaded: {type(err).__name__}: {first}")


def _apply_fewshot(task_dict: dict, num_fewshot: int | None, seed: int = 1234) -> None:
    """``simple_evaluate``'s rule: set each task's num_fewshot unless its YAML pins it to 0; same seed (1234)."""
    for task in task_dict["tasks"].values():
        if not hasattr(task, "_prunelab_yaml_fewshot"):  # what the YAML said, before any override
            task._prunelab_yaml_fewshot = task.get_config("num_fewshot")
        pinned = task._prunelab_yaml_fewshot == 0
        if num_fewshot is not None and not pinned:
            task.set_config(key="num_fewshot", value=int(num_fewshot))
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)


def _unregistered(err: BaseException) -> bool:
    return isinstance(err, KeyError) or "not a registered task" in str(err)


def load_tasks(tasks, include_path: str | list[str] | None = None, num_fewshot: int | None = 0) -> dict:
    """lm-eval's task dict (``{"tasks": {name: Task}, "groups": {...}, "group_map": {...}}``); loads the datasets.

    Unknown names fail first (:func:`check_task_names`). Names that the bundled / user folders define
    are loaded without indexing lm-eval's built-in tasks (milliseconds instead of 15-30 s). Any failure
    (dataset missing offline, bad YAML, ...) becomes a one-line ``ValueError`` naming the task.
    """
    names = _names(tasks)
    check_task_names(names, include_path)
    merged: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    local = task_manager(include_path, defaults=False)
    for name in names:
        is_local = name in local.task_index or name.endswith(".yaml")  # a YAML path needs no index
        manager = local if is_local else task_manager(include_path)
        try:
            try:
                with quiet():
                    loaded = manager.load([name])
            except Exception as err:
                if manager is not local or not _unregistered(err):
                    raise
                manager = task_manager(include_path)  # e.g. a local group of built-in tasks
                with quiet():
                    loaded = manager.load([name])
        except Exception as err:  # every failure becomes one line naming the task
            raise _load_error(name, err, manager) from err
        for task_name in loaded["tasks"]:
            if task_name in merged["tasks"]:
                raise ValueError(f"{KEY}: task '{task_name}' is requested twice (directly or through a group)")
        for key in merged:
            merged[key].update(loaded.get(key) or {})
    _apply_fewshot(merged, num_fewshot)
    return merged


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class InMemoryHFLM(HFLM):
        """lm-eval's HFLM on a model object; progress bars only when ``show_progress``."""

        show_progress = False

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    return InMemoryHFLM


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _metrics(entry: dict) -> dict[str, float | None]:
    """``{"acc": ..., "acc_stderr": ...}`` from lm-eval's ``"acc,none"`` keys (filter ``none`` first)."""
    out: dict[str, float | None] = {}
    for key in sorted(entry, key=lambda k: not k.endswith(",none")):
        if "," not in key:
            continue
        metric = key.split(",", 1)[0]
        if metric not in out:
            out[metric] = _number(entry[key])
    return out


def _batch_size(batch_size, device: str):
    text = str(batch_size)
    if text.startswith("auto"):
        return CPU_AUTO_BATCH_SIZE if device == "cpu" else text
    value = int(batch_size)
    if value < 1:
        raise ValueError(f"eval.zeroshot.batch_size={batch_size} must be 'auto' or a positive int")
    return value


def evaluate_zeroshot(model, tokenizer, task_dict_or_names, device: str, batch_size="auto", limit=None,
                      num_fewshot: int | None = 0, max_length: int | None = None, include_path=None, *,
                      max_batch_size: int = 64, bootstrap_iters: int = 1000, progress: bool = False) -> dict:
    """Accuracy of the in-memory ``model`` on lm-eval tasks; a JSON-serialisable dict.

    ``task_dict_or_names``: what :func:`load_tasks` returned (reusable across models) or task names.
    The model runs on ``device`` in eval mode under ``torch.no_grad``; it is moved there for the
    evaluation and back afterwards, and its train/eval mode and ``config.use_cache`` are restored: its
    weights are not touched. ``batch_size``: a positive int, or ``"auto"`` (lm-eval's out-of-memory
    search up to ``max_batch_size`` on CUDA, :data:`CPU_AUTO_BATCH_SIZE` on CPU). ``limit``: documents
    per task (int) or a fraction (float), None = all. ``max_length``: context window in tokens (None =
    from the model's config, 2048 if it has none); longer inputs are cut from the left.

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples", "version",
    "num_fewshot", "metrics"}}, "groups": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
    "tasks"}}, "average": {"acc", "acc_norm"}, "lm_eval_version", "batch_size": {"requested", "used"},
    "limit", "num_fewshot", "max_length", "device", "seconds"}``; accuracies are fractions in [0, 1],
    ``average`` is the unweighted mean over the leaf tasks (acc_norm over those that report it).
    """
    import lm_eval
    import torch
    from lm_eval.evaluator import evaluate

    start = time.perf_counter()
    if isinstance(task_dict_or_names, dict) and "tasks" in task_dict_or_names:
        task_dict = task_dict_or_names
        _apply_fewshot(task_dict, num_fewshot)
    else:
        task_dict = load_tasks(task_dict_or_names, include_path, num_fewshot)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    requested = batch_size
    bs = _batch_size(batch_size, target.type)
    try:
        with on_device(model, target):
            model.eval()
            if use_cache:
                config.use_cache = False  # scoring needs no KV / SSM cache
            with quiet(progress), torch.no_grad():
                lm = _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=bs, max_batch_size=max_batch_size,
                                 max_length=max_length, device=str(target))
                lm.show_progress = progress
                results = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=bootstrap_iters,
                                   log_samples=False)
    finally:
        if use_cache:
            config.use_cache = use_cache
        model.train(was_training)
        if target.type == "cuda":
            torch.cuda.empty_cache()
    used = list(lm.batch_sizes.values()) if lm.batch_sizes else bs
    group_map = {g: list(task_dict["group_map"].get(g, [])) for g in task_dict.get("groups") or {}}
    return {
        **_summary(results, group_map),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "batch_size": {"requested": requested, "used": used},
        "limit": limit,
        "num_fewshot": num_fewshot,
        "max_length": lm.max_length,
        "device": str(target),
        "backend": "memory",
        "seconds": round(time.perf_counter() - start, 3),
    }


def _summary(results: dict, group_map: dict[str, list[str]]) -> dict:
    """``tasks``, ``groups`` and their ``average`` from lm-eval's results dict (``evaluate``'s or the CLI's JSON)."""
    out_tasks, out_groups = {}, {}
    for name, entry in results["results"].items():
        metrics = _metrics(entry)
        summary = {k: metrics.get(k) for k in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")}
        if name in group_map:
            out_groups[name] = {**summary, "tasks": group_map[name]}
            continue
        n_samples = results.get("n-samples", {}).get(name, {})
        version = results.get("versions", {}).get(name)
        out_tasks[name] = {**summary, "samples": n_samples.get("effective"),
                           "version": version if isinstance(version, (int, float, str)) or version is None
                           else str(version),
                           "num_fewshot": results.get("n-shot", {}).get(name),
                           "metrics": {k: v for k, v in metrics.items() if k not in summary}}
    accs = [t["acc"] for t in out_tasks.values() if t["acc"] is not None]
    norms = [t["acc_norm"] for t in out_tasks.values() if t["acc_norm"] is not None]
    return {"tasks": out_tasks, "groups": out_groups,
            "average": {"acc": sum(accs) / len(accs) if accs else None,
                        "acc_norm": sum(norms) / len(norms) if norms else None}}


def _cli_include_path(include_path, workdir: Path) -> str:
    """One folder for lm_eval's ``--include_path`` (it takes a single one and does not follow symlinks): the bundled
    tasks' folder itself, or, with the user's folders too, copies of them all under ``workdir``."""
    import shutil

    paths = _include_paths(include_path)
    if len(paths) == 1:
        return paths[0]
    root = workdir / "tasks"
    for i, path in enumerate(paths):
        shutil.copytree(path, root / f"{i}_{Path(path).name}")
    return str(root)


def evaluate_zeroshot_cli(model, tokenizer, tasks, device: str, batch_size="auto", limit=None,
                          num_fewshot: int | None = 0, max_length: int | None = None, include_path=None, *,
                          max_batch_size: int = 64, timeout: float | None = None, native_state=None,
                          checkpoint: str | Path | None = None) -> dict:
    """The same evaluation as :func:`evaluate_zeroshot`, through lm-eval's own command line (``eval.zeroshot.backend:
    cli``): ``model`` and ``tokenizer`` are saved (``save_pretrained``) to a temporary folder, and
    ``python -m lm_eval --model hf --model_args pretrained=<folder>,dtype=<the model's>,max_length=<max_length>``
    runs in a subprocess with the same tasks, batch size (``auto`` resolved as the in-memory path resolves it),
    limit, few-shot count and task folders, with this process's torch thread count and the Hugging Face hub
    offline (the runner has loaded the tasks' datasets into the cache already). Its results JSON is summarised
    as :func:`evaluate_zeroshot` summarises its results; ``seconds`` is the whole path (save + subprocess), ``cli``
    has the command, the save and subprocess wall times and lm-eval's own ``total_evaluation_time_seconds``.
    The model must reload with ``from_pretrained`` (not a structurally pruned one); ``native_state``: the adapter's
    map of a state dict to the family's checkpoint layout (GPT-2's ``Conv1D`` weights), applied to what is saved.
    ``checkpoint``: a folder that already holds the model and its tokenizer (an onloaded model's: the checkpoint its
    blocks are read from), given to lm-eval as it is, nothing saved. lm-eval is not imported here.
    A failing command raises RuntimeError with the end of its output."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile
    from importlib import metadata

    import torch

    start = time.perf_counter()
    names = _names(tasks)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    bs = _batch_size(batch_size, target.type)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    workdir = Path(tempfile.mkdtemp(prefix="prunelab-lm-eval-"))
    try:
        if checkpoint is None:
            checkpoint = workdir / "model"
            state = model.state_dict()
            model.save_pretrained(checkpoint, state_dict=native_state(state) if native_state is not None else state)
            tokenizer.save_pretrained(checkpoint)
        saved = time.perf_counter()
        model_args = f"pretrained={checkpoint},dtype={dtype}" + (f",max_length={max_length}" if max_length else "")
        command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args,
                   "--tasks", ",".join(names), "--include_path", _cli_include_path(include_path, workdir),
                   "--device", str(target), "--batch_size", str(bs), "--max_batch_size", str(max_batch_size),
                   "--output_path", str(workdir / "results")]
        if num_fewshot is not None:
            command += ["--num_fewshot", str(int(num_fewshot))]
        if limit is not None:
            command += ["--limit", str(limit)]
        threads = str(torch.get_num_threads())
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        finished = time.perf_counter()
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"lm_eval exited with code {proc.returncode}: {' '.join(command)}\n{tail}")
        files = sorted((workdir / "results").rglob("results_*.json"))
        if not files:
            raise RuntimeError(f"lm_eval wrote no results_*.json: {' '.join(command)}")
        results = json.loads(files[-1].read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    config = results.get("config") or {}
    used = config.get("batch_sizes") or config.get("batch_size")
    used = int(used) if isinstance(used, str) and used.isdigit() else used  # the CLI's JSON has the flag's string
    reported = results.get("total_evaluation_time_seconds")
    try:
        lm_eval_version = metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        lm_eval_version = None
    return {
        **_summary(results, {g: list(s) for g, s in (results.get("group_subtasks") or {}).items() if s}),
        "lm_eval_version": lm_eval_version,
        "batch_size": {"requested": batch_size, "used": used},
        "limit": limit,
        "num_fewshot": num_fewshot,
        "max_length": max_length,
        "device": str(target),
        "backend": "cli",
        "seconds": round(time.perf_counter() - start, 3),
        "cli": {"command": [str(c) for c in command], "save_s": round(saved - start, 3),
                "wall_s": round(finished - saved, 3),
                "reported_evaluation_s": round(float(reported), 3) if reported is not None else None},
    }
