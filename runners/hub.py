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
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def offline_by_choice() -> bool:
    """``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` is set."""
    return any(_truthy(os.environ.get(flag)) for flag in OFFLINE_FLAGS)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint (``HF_ENDPOINT`` or huggingface.co), once per process; False when an
    offline flag is set."""
    if offline_by_choice():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:  # no DNS, refused, timed out
        return False


def go_offline() -> None:
    """Every library reads its cache only, without retries (the environment flags, and the module constants that
    huggingface_hub and datasets read them into at import)."""
    for flag in OFFLINE_FLAGS:
        os.environ[flag] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True
    try:
        import datasets.config as datasets_config
    except ImportError:  # pragma: no cover (a dependency)
        return
    datasets_config.HF_HUB_OFFLINE = True
    datasets_config.HF_DATASETS_OFFLINE = True


def model_cached(repo_id: str, revision: str | None = None) -> bool:
    """The hub model's config.json is in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
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


def check_hub(model_id: str | None, revision: str | None, datasets_needed: dict[str, tuple[str, str]],
              tasks: bool = False) -> None:
    """Raise ValueError (one line naming the key) when the hub is unreachable and something the run needs from it is
    not cached; switch to offline mode when it is unreachable. ``model_id``: a hub model id (None: local);
    ``datasets_needed``: ``{config key: (hub dataset id, the dataset_root key that would replace it)}``; ``tasks``:
    lm-eval tasks that read hub datasets (offline mode makes them fail fast where they load, naming the task)."""
    if model_id is None and not datasets_needed and not tasks:
        return
    if hub_reachable():
        return
    why = "offline mode is set (HF_HUB_OFFLINE)" if offline_by_choice() else "the hub is unreachable"
    go_offline()
    if model_id is not None and not model_cached(model_id, revision):
        raise ValueError(f"model.path={model_id}: not in the local Hugging Face cache and {why}: give a local folder "
                         f"(model.path=/path/to/checkpoint) or download it once where the hub is reachable")
    for key, (hub_path, root_key) in datasets_needed.items():
        if not dataset_cached(hub_path):
            raise ValueError(f"{key}: dataset {hub_path} is not in the local Hugging Face cache and {why}: set "
                             f"{root_key} to a local copy (<{root_key}>/{hub_path}), use the bundled data (calib=tiny, "
                             f"eval=tiny), or download it once where the hub is reachable")
