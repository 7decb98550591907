"""Dataset loaders for the bundled PruneLab tasks (``custom_dataset: !function austen_data.load_*``).

lm-eval resolves relative ``data_files`` against the process cwd; these loaders read the JSONL files
next to this module instead, so the tasks work from any directory. The rows are built in memory
(``datasets.Dataset.from_list``): nothing is written to the Hugging Face datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    import datasets

    with open(HERE / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_next(**_metadata):
    """``austen_next`` (lm-eval passes the task metadata / model args as keyword arguments: ignored)."""
    return _load("austen_next")


def load_cloze(**_metadata):
    """``austen_cloze``."""
    return _load("austen_cloze")
