"""The Hugging Face hub before any work: reachable, or offline with what the run needs in the local cache.

An unreachable hub used to cost 35-70 s of retries per model / dataset / task and a traceback. Here one TCP connect
(``probe_timeout`` seconds) decides; unreachable (or ``HF_HUB_OFFLINE=1``) switches every library to its cache
(:func:`go_offline`: no retries), and a model or dataset the run needs that is not cached is one ``ConfigError``
line naming the key and what to do, before any model loads (docs/evaluation.md §1.1).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
MODEL_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # what makes models (and the hub) offline
DATASET_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")  # what makes datasets offline
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def flag_set(flags: tuple[str, ...]) -> str | None:
    """The first of ``flags`` set in the environment, or None."""
    return next((flag for flag in flags if _truthy(os.environ.get(flag))), None)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint (``HF_ENDPOINT`` or huggingface.co), once per process; False when
    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set. Not probed (taken as reachable) behind a proxy
    (``HTTPS_PROXY`` / ``ALL_PROXY``: the libraries go through it, a direct connect says nothing) or with
    ``PRUNELAB_HUB_PROBE=0``."""
    if flag_set(MODEL_FLAGS):
        return False
    if any(os.environ.get(var) for var in PROXY_VARS) or os.environ.get("PRUNELAB_HUB_PROBE", "1").strip() == "0":
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # no DNS, refused, timed out
        return False


def go_offline(datasets_only: bool = False) -> None:
    """The libraries read their caches only, without retries: datasets (``HF_DATASETS_OFFLINE``), and unless
    ``datasets_only`` the hub and transformers too (``HF_HUB_OFFLINE``); the environment flags and the module
    constants huggingface_hub and datasets read them into at import."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets.config as datasets_config

        datasets_config.HF_DATASETS_OFFLINE = True
        if not datasets_only:
            datasets_config.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover (a dependency)
        pass
    if datasets_only:
        return
    for flag in MODEL_FLAGS:
        os.environ[flag] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True


def file_cached(repo_id: str, filename: str, revision: str | None = None) -> bool:
    """``filename`` of the hub model ``repo_id`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except ValueError:  # not a valid repo id
        return False


def dataset_cached(hub_path: str) -> bool:
    """Some copy of the hub dataset is cached: its hub download (``datasets--org--name``) or the datasets library's
    prepared copy (``org___name``); matched by the last part of the id (the hub renames ``wikitext`` to
    ``Salesforce/wikitext``). Lenient: a partial copy still fails, quickly, where the data loads."""
    import datasets.config as datasets_config
    import huggingface_hub.constants as hub_constants

    name = hub_path.rstrip("/").split("/")[-1]
    hub_cache, datasets_cache = Path(hub_constants.HF_HUB_CACHE), Path(datasets_config.HF_DATASETS_CACHE)
    return any(hub_cache.glob(f"datasets--*{name}")) or any(datasets_cache.glob(f"*{name}"))


def check_hub(models: dict[str, tuple[str, tuple[str, ...]]], revision: str | None, datasets_needed: dict[str, tuple[str, str]],
              tasks: bool = False) -> None:
    """Raise ValueError (one line naming the key) when the hub is unreachable (or an offline flag is set) and
    something the run needs from it is not cached, after switching the libraries to their caches. ``models``:
    ``{config key: (hub repo id, files of which one must be cached)}`` (the model's config.json or GGUF file, a
    hub tokenizer's tokenizer_config.json or tokenizer.json); ``datasets_needed``: ``{config key: (hub dataset id, the dataset_root key that
    would replace it)}``; ``tasks``: lm-eval tasks read hub datasets (offline, they fail fast where they load, naming
    the task)."""
    if not models and not datasets_needed and not tasks:
        return
    reachable = hub_reachable()
    datasets_flag = flag_set(DATASET_FLAGS)
    if reachable and not datasets_flag:
        return
    if not reachable:
        why = f"offline mode is set ({flag_set(MODEL_FLAGS)})" if flag_set(MODEL_FLAGS) else "the hub is unreachable"
        go_offline()
        for key, (repo_id, filenames) in models.items():
            if not any(file_cached(repo_id, name, revision if key == "model.path" else None) for name in filenames):
                raise ValueError(f"{key}={repo_id}: not in the local Hugging Face cache and {why}: give a "
                                 f"local folder ({key}=/path/to/it) or download it once where the hub is reachable")
    else:
        why = f"offline mode is set ({datasets_flag})"
        go_offline(datasets_only=True)
    for key, (hub_path, root_key) in datasets_needed.items():
        if not dataset_cached(hub_path):
            raise ValueError(f"{key}: dataset {hub_path} is not in the local Hugging Face cache and {why}: set "
                             f"{root_key} to a local copy (<{root_key}>/{hub_path}), use the bundled data (calib=tiny, "
                             f"eval=tiny), or download it once where the hub is reachable")
