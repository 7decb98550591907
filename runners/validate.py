"""Check a composed config before any model weights are loaded (docs/architecture.md §4.2).

Every problem becomes a :class:`ConfigError` whose message names the key; the runner prints it as
one line and exits with code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

import models
from evaluators.ppl import Protocol, resolve_protocol
from pruners import Pattern, Pruner, build_pruner
from pruners.allocation import Allocation, check_against
from pruners.base import ScoreMaskPruner

from . import schema

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """Bad user input: one line, exit code 2."""


@dataclass
class Plan:
    """A validated run: everything derived from the config that the run needs."""

    pruner: Pruner
    pattern: Pattern
    device: str
    model_path: str
    model_type: str
    calib_seqlen: int
    eval_seqlen: int
    protocols: list[Protocol]
    zeroshot_tasks: list[str]
    allocation: Allocation = field(default_factory=Allocation)

    @property
    def calibrates(self) -> bool:
        """Whether the run loads calibration windows: the method needs them, or the allocation does (OWL)."""
        return self.pruner.removes_weights and (self.pruner.needs_calibration or self.allocation.needs_calibration)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but CUDA is not available (use device=cpu or device=auto)")
        return name
    if name != "cpu":
        raise ConfigError(f"device={name} is not one of: auto, cpu, cuda, cuda:N")
    return name


def _positive_int(value, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value} must be a positive integer")
    return value


def _check_missing(cfg: DictConfig) -> None:
    for key in ("model.path", "calib.path"):
        try:
            OmegaConf.select(cfg, key, throw_on_missing=True)
        except MissingMandatoryValue:
            raise ConfigError(f"{key} is required for this config (e.g. {key}=/path/to/...)") from None


def validate(cfg: DictConfig, check_model: bool = True, check_hub: bool | None = None) -> Plan:
    """Raise ConfigError on the first problem; otherwise return the Plan. Reads at most the model's config.json.
    ``check_hub`` (default: ``check_model``): what the run reads from the Hugging Face hub is reachable or cached."""
    try:
        schema.check(cfg)  # unknown keys, types, ranges (runners/schema.py)
    except schema.SchemaError as err:
        raise ConfigError(str(err)) from None
    _check_missing(cfg)
    try:
        pattern = Pattern.from_config(cfg.sparsity)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"sparsity: {err}") from None
    try:
        pruner = build_pruner(OmegaConf.to_container(cfg.pruner, resolve=True))
        pruner.check(pattern)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"pruner: {err}") from None
    try:
        allocation = Allocation.from_config(cfg.sparsity)
        allocation.check(pattern)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not allocation.is_default and pruner.removes_weights:
        if pruner.scope != "block" or pattern.removes_units:
            raise ConfigError(f"sparsity.allocation={allocation.kind} (targets / ignore): pruner '{pruner.name}' "
                              f"allocates its own sparsity; use the defaults (uniform, targets [*], ignore [])")
        if allocation.kind == "global" and not isinstance(pruner, ScoreMaskPruner):
            raise ConfigError(f"sparsity.allocation=global needs a method with a per-weight score (magnitude, wanda), "
                              f"not '{pruner.name}'")
    # (types, ranges and choices of every key: the schema above; here what needs the world or several keys)
    device = resolve_device(str(cfg.device))
    model_seqlen = int(cfg.model.seqlen)
    # null = model.seqlen; 0 is not "the default" (the schema rejects it)
    calib_seqlen = model_seqlen if cfg.calib.seqlen is None else int(cfg.calib.seqlen)
    eval_seqlen = model_seqlen if cfg.eval.ppl.seqlen is None else int(cfg.eval.ppl.seqlen)
    if pruner.needs_calibration or allocation.needs_calibration:
        if cfg.calib.source == "text":
            try:
                import corpora

                corpora.check_text_path(cfg.calib.path)
            except FileNotFoundError as err:
                raise ConfigError(f"calib.path: {err}") from None
    try:
        protocols = [resolve_protocol(str(entry)) for entry in cfg.eval.ppl.datasets]
    except ValueError as err:
        raise ConfigError(str(err)) from None
    zeroshot_tasks = _check_zeroshot(cfg.eval.get("zeroshot"))
    every = cfg.eval.get("shots_every") or 0
    if every:
        if not getattr(pruner, "calls_on_shot", False) or not pruner.removes_weights:
            raise ConfigError(f"eval.shots_every={every}: pruner '{pruner.name}' does not hand out its intermediate "
                              f"shots (surgeon, kobd, lobd do)")
        if pattern.kind not in ("unstructured", "rowcol"):
            raise ConfigError(f"eval.shots_every={every}: the intermediate shots of a {pattern.kind} run are not "
                              f"{pattern.kind} patterns (unstructured and rowcol only)")
    if pruner.max_windows is not None and pruner.needs_calibration and int(cfg.calib.nsamples) > pruner.max_windows:
        raise ConfigError(f"calib.nsamples={cfg.calib.nsamples}: pruner '{pruner.name}' holds {pruner.max_windows} "
                          f"calibration windows at most")
    if cfg.engine.get("onload"):
        _check_onload(cfg, pruner, zeroshot_tasks)
    _check_activations(cfg, pruner, pruner.needs_calibration or allocation.needs_calibration)
    if cfg.engine.get("resume") and pruner.removes_weights and not pruner.resumable():
        from pruners import PRUNERS

        resumable = ", ".join(sorted(n for n, c in PRUNERS.items() if c.resumable() and c.removes_weights))
        raise ConfigError(f"engine.resume=true: pruner '{pruner.name}' does not go block by block (or shot by shot), "
                          f"keeping each as it is done ({resumable} do)")
    if zeroshot_tasks and cfg.eval.zeroshot.get("backend") == "cli" and pattern.removes_units \
            and pruner.removes_weights:
        raise ConfigError("eval.zeroshot.backend=cli: lm_eval loads the saved model with from_pretrained, which cannot "
                          "rebuild a structurally pruned one; use eval.zeroshot.backend=memory")
    _check_report(cfg.get("report"))
    speed = _check_speed(cfg.get("speed"))
    published = cfg.get("report", {}).get("published")
    if published and not published_path(published).is_file():
        raise ConfigError(f"report.published={published}: no file {published_path(published)}")
    if cfg.model.dtype not in ("auto", *models.loading.DTYPES):
        raise ConfigError(f"model.dtype={cfg.model.dtype} is not one of: auto, {', '.join(models.loading.DTYPES)}")

    model_path, model_type = str(cfg.model.path), "unchecked"
    if check_model if check_hub is None else check_hub:  # (first: offline, one quick line, not a minute of retries)
        _check_hub(cfg, pruner.needs_calibration or allocation.needs_calibration, protocols, zeroshot_tasks)
    if check_model:
        try:
            model_path, hf_config, _ = models.inspect_model(cfg.model)
        except models.UnsupportedModelError as err:
            raise ConfigError(f"model.path={cfg.model.path}: {err}") from None
        except models.loading.DamagedCheckpoint as err:
            raise ConfigError(f"model.path={cfg.model.path}: {err}") from None
        except (OSError, ValueError) as err:  # missing directory, unreachable hub, bad config.json
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.path={cfg.model.path}: cannot load the model config ({first})") from None
        model_type = hf_config.model_type
        family = models.adapter_class(model_type).family
        if pruner.families is not None and family not in pruner.families:
            raise ConfigError(f"pruner '{pruner.name}' drives {', '.join(pruner.families)} models, not {family} "
                              f"(model.path={cfg.model.path})")
        if pattern.kind == "experts" and pruner.removes_weights:  # whole MoE experts: top-k per layer left
            _check_experts(cfg, pattern, pruner, model_path)
        elif pattern.removes_units and not models.adapter_class(model_type).has_units:
            raise ConfigError(f"sparsity.kind={pattern.kind}: {models.adapter_class(model_type).family} models have "
                              f"no structural units yet (unstructured and N:M only)")
        if cfg.engine.get("onload"):
            _check_onload_model(cfg, models.adapter_class(model_type), model_path)
        _check_modality(cfg, models.adapter_class(model_type).modality, hf_config,
                        pruner.needs_calibration or allocation.needs_calibration, protocols, zeroshot_tasks, calib_seqlen,
                        pruner)
        if pruner.removes_weights and not allocation.is_default:  # the globs against the architecture's linears
            try:
                check_against(models.loading.meta_adapter(cfg.model), allocation, pattern)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if pruner.removes_weights and pattern.attention_only:  # sparsity=heads: the family must have heads
            try:
                meta = models.loading.meta_adapter(cfg.model)
                meta.structure_groups(meta.blocks()[0], attention_only=True)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if pruner.removes_weights and getattr(pruner, "reads_attention", False):  # GOA's head similarity
            meta = models.loading.meta_adapter(cfg.model)
            if (any(g.attention for g in meta.unit_groups(meta.blocks()[0]))
                    and type(meta).query_key is models.Adapter.query_key):
                raise ConfigError(f"pruner={pruner.name}: model family '{meta.family}' does not expose its attention "
                                  f"queries and keys (the head similarity needs them); use numerical, flap or wanda_sp")
            try:  # (its depth-2 modules: attention + MLP; not a Mamba mixer)
                pruner.modules(meta, meta.blocks()[0])
            except ValueError as err:
                raise ConfigError(f"pruner.name={pruner.name}: {err}") from None
        blocks = getattr(pruner, "blocks", None)
        if pruner.removes_weights and blocks is not None:  # a block range past the model would prune less, silently
            count = len(models.loading.meta_adapter(cfg.model).blocks())
            if blocks[1] > count:
                raise ConfigError(f"pruner.blocks={list(blocks)} goes past the model's {count} blocks "
                                  f"(model={cfg.model.name}): the stop must be <= {count}")
        limit = getattr(hf_config, "max_position_embeddings", None)
        for key, value in (("calib.seqlen", calib_seqlen), ("eval.ppl.seqlen", eval_seqlen),
                           ("speed.prompt_len + speed.new_tokens", speed)):
            if limit and value > limit:
                raise ConfigError(f"{key}={value} exceeds the model's max_position_embeddings={limit}")
    return Plan(pruner, pattern, device, model_path, model_type, calib_seqlen, eval_seqlen, protocols, zeroshot_tasks,
                allocation)


def _check_modality(cfg, modality: str, hf_config, calibrates: bool, protocols, zeroshot_tasks, calib_seqlen: int,
                    pruner) -> None:
    """Text data for text models, generated data and image metrics for image generators (docs/imagegen.md)."""
    name = f"model={cfg.model.name}"
    image_eval = "image" in cfg.eval
    if modality == "image":
        if calibrates and cfg.calib.source != "generated":
            raise ConfigError(f"calib.source={cfg.calib.source}: {name} generates images, not text; calibrate it on "
                              f"its own samples: calib=generated")
        if protocols:
            raise ConfigError(f"eval.ppl.datasets={[p.name for p in protocols]}: {name} generates images; text "
                              f"perplexity does not apply (eval=image, or eval.ppl.datasets=[])")
        if zeroshot_tasks:
            raise ConfigError(f"eval.zeroshot.tasks: {name} generates images; lm-eval tasks do not apply")
        if calibrates and not 2 <= calib_seqlen <= 1 + hf_config.block_size:
            raise ConfigError(f"calib.seqlen={calib_seqlen}: {name} windows have 2 to {1 + hf_config.block_size} "
                              f"positions (class + image tokens)")
        if getattr(pruner, "calibration", "data") == "self-generated":  # (GOA's data-free variant samples text)
            raise ConfigError(f"pruner.calibration=self-generated: {name} generates images; its own samples are "
                              f"calib=generated (with pruner.calibration=data)")
        if image_eval and cfg.eval.image.get("features", "auto") != "none":  # the reference fits these images
            from evaluators.image import check_reference

            try:
                check_reference(cfg.eval.image, hf_config)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        return
    if calibrates and cfg.calib.source == "generated":
        raise ConfigError(f"calib.source=generated: only image generators calibrate on their own samples ({name} is "
                          f"a text model: calib=tiny, c4, wikitext2 or text)")
    if image_eval:
        raise ConfigError(f"eval.image: {name} is a text model; image metrics need an image generator "
                          f"(e.g. model=tiny-imagegen)")


def _check_speed(section) -> int:
    """``speed``: the batch sizes (an int or a list: the schema types it, their values here); returns the longest
    sequence it generates (0 when off)."""
    if section is None:
        return 0
    sizes = section.get("batch_size")
    if OmegaConf.is_list(sizes):
        if not sizes:
            raise ConfigError("speed.batch_size=[] must be a positive integer or a non-empty list of them")
        for i, size in enumerate(sizes):
            _positive_int(size, f"speed.batch_size[{i}]")
    else:
        _positive_int(sizes, "speed.batch_size")
    return 0 if section.mode == "never" else int(section.prompt_len) + int(section.new_tokens)


def _check_activations(cfg, pruner, calibrates: bool) -> None:
    """``engine.activations`` (models/blocks.py: KeptBatches): host or disk for the methods that walk the blocks
    (``calibrates``: the run reads calibration windows, for the method or for its allocation's pass: OWL)."""
    place = str(cfg.engine.get("activations") or "device")
    if place == "device" or not pruner.removes_weights or not calibrates:
        return
    if place == "disk" and cfg.engine.get("offload_dir") is None:
        raise ConfigError("engine.activations=disk needs engine.offload_dir (the folder the batches are written to)")
    if pruner.needs_calibration and not pruner.onloads():
        from pruners import PRUNERS

        walkers = ", ".join(sorted(n for n, c in PRUNERS.items() if c.onloads() and c.needs_calibration))
        raise ConfigError(f"engine.activations={place}: pruner '{pruner.name}' keeps its own activations ({walkers} "
                          f"walk the blocks and keep theirs off the device; the gradient methods' block inputs go "
                          f"with engine.offload_dir alone)")


def _check_onload(cfg, pruner, zeroshot_tasks) -> None:
    """``engine.onload=true`` (models/onload.py): what can run with one block materialised at a time."""
    if pruner.removes_weights and not pruner.onloads():
        from pruners import PRUNERS

        layerwise = ", ".join(sorted(n for n, c in PRUNERS.items() if c.onloads() and c.removes_weights))
        raise ConfigError(f"engine.onload=true: pruner '{pruner.name}' does not go block by block ({layerwise} "
                          f"do)")
    if zeroshot_tasks and cfg.eval.zeroshot.get("backend", "memory") != "cli":
        raise ConfigError("engine.onload=true: eval.zeroshot needs the whole model in this process; "
                          "eval.zeroshot.backend=cli runs lm-eval's own command on the run's checkpoint")
    if str(cfg.speed.mode) == "always":
        raise ConfigError("engine.onload=true: speed.mode=always needs the whole model on the device")
    if str(cfg.eval.get("ppl", {}).get("mode", "auto")) == "full":
        raise ConfigError("engine.onload=true: eval.ppl.mode=full needs the whole model on the device (auto or "
                          "sequential: one block at a time)")
    if cfg.model.get("gguf_file"):
        raise ConfigError("engine.onload=true: model.gguf_file: onloading reads safetensors checkpoints (save the "
                          "model with save_pretrained first)")


def _check_onload_model(cfg, adapter_cls, model_path: str) -> None:
    if adapter_cls.modality != "text":
        raise ConfigError(f"engine.onload=true: {adapter_cls.family} models cannot be onloaded yet (an image "
                          f"generator's tokenizer and sampling need the whole model)")
    from models.checkpoint import read_structure

    structure = read_structure(model_path)  # (onloaded where its config says its shapes: e.g. experts dropped evenly)
    if structure is not None and not structure.get("plain_from_pretrained"):
        raise ConfigError(f"engine.onload=true: model.path={cfg.model.path} is a structurally pruned checkpoint "
                          f"whose blocks differ in shape (its config cannot say them); load it whole")


def _check_report(section) -> None:
    """``report.columns`` (runners/columns.py names) and ``report.baseline`` (a pruner or ``<config key>=<value>``):
    read by runners.report only, checked here so that a typo fails before the sweep rather than after it."""
    if section is None:
        return
    from . import columns

    for spec in section.get("columns") or []:
        try:
            columns.check_column(str(spec))
        except ValueError as err:
            raise ConfigError(f"report.columns: {err}") from None
    from pruners import PRUNERS

    known = {f"pruner.{k}" for cls in PRUNERS.values() for k in cls.config_keys()}
    for key in section.get("label_keys") or []:
        if str(key) not in known:
            raise ConfigError(f"report.label_keys: {key} is not a key of any pruner (pruner.<key>, e.g. pruner.remedy)")
    baseline = section.get("baseline")
    if baseline is None:
        return
    try:
        key, value = columns.parse_baseline(str(baseline))
    except ValueError as err:
        raise ConfigError(f"report.baseline={baseline}: {err}") from None
    if key == "method" and value not in PRUNERS:
        raise ConfigError(f"report.baseline={baseline} is not a pruner (choose from: {', '.join(sorted(PRUNERS))}) "
                          f"nor <config key>=<value>")
    if key != "method" and key.split(".", 1)[0] not in schema.Config.__dataclass_fields__:
        raise ConfigError(f"report.baseline={baseline}: {key} is not a config key")


def _local_tokens(tokenizer, source: str, split: str, path: str | None, where: str) -> int:
    """Token count of a local text (bundled split or file), or a ConfigError starting with ``where`` (the key and
    its value) when it cannot be read as UTF-8 text."""
    import corpora

    try:
        text, _ = corpora.read_text(source, split, path)
    except OSError as err:  # missing, unreadable
        raise ConfigError(f"{where}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at position {err.start})"
                          ) from None
    return int(corpora.tokenize_text(tokenizer, text).numel())


def check_local_data(cfg, plan: Plan, tokenizer=None) -> None:
    """Local calibration and evaluation texts (the bundled corpus, ``calib=text``, file entries of
    ``eval.ppl.datasets``) read and tokenized before any model is loaded or evaluated: a text that is not UTF-8,
    shorter than one window, or too short for ``calib.nsamples`` windows (at most one token in ``seqlen`` windows'
    worth: ``nsamples · seqlen`` may not exceed the text's tokens) is a ConfigError naming the key. Hub datasets
    are checked where they load. ``tokenizer``: the model's, loaded here when None and needed."""
    calib = plan.calibrates and cfg.calib.source in ("bundled", "text")
    local_eval = [p for p in plan.protocols if p.source in ("bundled", "text")]
    if not calib and not local_eval:
        return
    if tokenizer is None:
        from models.loading import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.model)
        except (OSError, ValueError) as err:
            raise ConfigError(str(err).splitlines()[0]) from None
    if calib:
        where = (f"calib.path={cfg.calib.get('path')}" if cfg.calib.source == "text"
                 else "calib=tiny (the bundled train split)")
        tokens = _local_tokens(tokenizer, cfg.calib.source, "train", cfg.calib.get("path"), where)
        seqlen, windows = plan.calib_seqlen, int(cfg.calib.nsamples) + plan.pruner.extra_windows()
        if tokens <= seqlen + 1:
            raise ConfigError(f"{where}: {tokens} tokens, fewer than one calibration window of {seqlen} (calib.seqlen)")
        if windows * seqlen > tokens:
            extra = f" (+{plan.pruner.extra_windows()} of pruner.remedy_samples)" if plan.pruner.extra_windows() else ""
            raise ConfigError(f"calib.nsamples={cfg.calib.nsamples}{extra}: {windows} windows of {seqlen} tokens need "
                              f"{windows * seqlen} tokens, the calibration text ({where}) has {tokens}: at most "
                              f"{tokens // seqlen} windows")
    for protocol in local_eval:
        name = protocol.path if protocol.source == "text" else protocol.name
        tokens = _local_tokens(tokenizer, protocol.source, protocol.split, protocol.path, f"eval.ppl.datasets: {name}")
        if tokens < plan.eval_seqlen:
            raise ConfigError(f"eval.ppl.datasets: {name}: {tokens} tokens, fewer than one window of "
                              f"{plan.eval_seqlen} (eval.ppl.seqlen)")


def published_path(name: str) -> Path:
    """The published numbers a preset is reported against: ``conf/experiment/<name>.published.csv``."""
    return CONF_DIR / "experiment" / f"{name}.published.csv"


def _check_zeroshot(section) -> list[str]:
    """``eval.zeroshot``: task names lm-eval knows, batch size ``auto`` or a positive int, a sane limit."""
    if section is None or not section.get("tasks"):
        return []
    tasks = [str(t) for t in section.tasks]
    batch_size = section.get("batch_size", "auto")
    if not (batch_size == "auto" or str(batch_size).startswith("auto:")):
        _positive_int(batch_size, "eval.zeroshot.batch_size")
    limit = section.get("limit")
    if limit is not None and not (isinstance(limit, int) and limit >= 1 or isinstance(limit, float) and 0 < limit <= 1):
        raise ConfigError(f"eval.zeroshot.limit={limit} must be null, a positive int (docs per task) or a fraction in (0, 1]")
    fewshot = section.get("num_fewshot", 0)
    if not isinstance(fewshot, int) or isinstance(fewshot, bool) or fewshot < 0:
        raise ConfigError(f"eval.zeroshot.num_fewshot={fewshot} must be a non-negative integer")
    from evaluators.zeroshot import check_task_names

    try:
        check_task_names(tasks, _include_paths(section))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return tasks


def _include_paths(section) -> list[str] | None:
    paths = section.get("include_path")
    if paths is None:
        return None
    paths = [str(paths)] if isinstance(paths, str) else [str(p) for p in paths]
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(f"eval.zeroshot.include_path={path}: no such directory")
    return paths


def _check_hub(cfg, calibrates: bool, protocols, zeroshot_tasks) -> None:
    """What the run reads from the Hugging Face hub, checked against its reachability and the local cache
    (:func:`runners.hub.check_hub`)."""
    import corpora
    from evaluators.zeroshot import BUNDLED_TASKS

    from .hub import check_hub

    def hub_id(path, key):
        try:
            is_hub = models.loading.resolve_path(path, key) == path and not Path(path).expanduser().exists()
        except FileNotFoundError:
            return None  # (a missing local folder: the model check below says so)
        return path if is_hub else None

    hub_models = {}
    if hub_id(str(cfg.model.path), "model.path"):
        hub_models["model.path"] = (str(cfg.model.path), (cfg.model.get("gguf_file") or "config.json",))
    if cfg.model.get("tokenizer") and hub_id(str(cfg.model.tokenizer), "model.tokenizer"):
        hub_models["model.tokenizer"] = (str(cfg.model.tokenizer), ("tokenizer_config.json", "tokenizer.json"))
    needed = {}
    sources = [(f"calib={cfg.calib.source}", cfg.calib.source, "calib.dataset_root", cfg.calib.get("dataset_root"))
               ] if calibrates else []
    sources += [(f"eval.ppl.datasets ({p.name})", p.source, "eval.ppl.dataset_root", cfg.eval.ppl.get("dataset_root"))
                for p in protocols]
    for key, source, root_key, root in sources:
        if source not in corpora.HUB:
            continue
        hub_path = corpora.HUB[source]["path"]
        if not root:
            needed[key] = (hub_path, root_key)
        elif not (Path(root).expanduser() / hub_path).exists():
            raise ConfigError(f"{root_key}={root}: no {Path(root).expanduser() / hub_path} ({key} reads "
                              f"<{root_key}>/{hub_path})")
    hub_tasks = any(task not in BUNDLED_TASKS for task in zeroshot_tasks)
    try:
        check_hub(hub_models, cfg.model.get("revision"), needed, hub_tasks)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_writable(cfg: DictConfig) -> None:
    """``output_root`` (and the sweep folder in it) can be created and written, before any work: a read-only or
    file-occupied location is one line naming the key, not a traceback after the run."""
    import tempfile

    root = Path(str(cfg.output_root)).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_root={cfg.output_root} is a file, not a folder")
    try:
        folder = root / str(cfg.sweep)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"output_root={cfg.output_root}: cannot write there ({err.strerror or err})") from None


def _check_experts(cfg, pattern, pruner, model_path) -> None:
    """``sparsity=experts``: a ratio that leaves every MoE layer the experts each token is routed to (a pruned
    checkpoint: its layers' counts now, from its structure file)."""
    from models.checkpoint import read_structure
    from pruners.expert_drop import experts_removed

    try:
        count, top_k = models.loading.meta_adapter(cfg.model).expert_layout()
    except ValueError as err:
        raise ConfigError(f"sparsity.kind=experts: {err}") from None
    structure = read_structure(model_path) if model_path is not None else None
    if structure is not None:  # (a pruned checkpoint: its layers' counts now)
        count = min((b["expert"] for b in structure["blocks"] if "expert" in b), default=count)
    try:
        experts_removed(pattern.ratio, count, top_k, getattr(pruner, "rounding", "floor"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
