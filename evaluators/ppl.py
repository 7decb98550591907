"""Token-level perplexity under named protocols (docs/evaluation.md §1).

A protocol fixes the dataset, split, the string that joins documents, how many documents / windows
are used, and BOS handling (the whole text is tokenized once with the tokenizer's defaults, as in
SparseGPT). The text is cut into non-overlapping windows of ``seqlen`` tokens, the remainder dropped;
``ppl = exp(mean over windows of the mean next-token NLL of the window)`` — identical to the
reference's ``exp(sum(nll_i * seqlen) / (n * seqlen))``. Every number is recorded as
``<protocol>@<seqlen>``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import corpora
from models.blocks import capture_block_inputs, on_device, run_blocks
from models.onload import store_of


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str  # bundled | text | wikitext2 | ptb | c4
    split: str
    join: str
    max_docs: int | None = None
    max_windows: int | None = None
    reference: str = ""
    path: str | None = None  # local text file (source == "text")


PROTOCOLS = {
    "wikitext2": Protocol("wikitext2", "wikitext2", "test", "\n\n",
                          reference="SparseGPT/Wanda: wikitext-2-raw-v1 test joined by '\\n\\n'"),
    "ptb": Protocol("ptb", "ptb", "test", " ", reference="SparseGPT: ptb_text_only test joined by ' '"),
    "ptb-val": Protocol("ptb-val", "ptb", "validation", "\n\n",
                        reference="LLM-Pruner/FLAP: ptb_text_only validation joined by '\\n\\n'"),
    "c4": Protocol("c4", "c4", "validation", " ", max_docs=1100, max_windows=256,
                   reference="SparseGPT/Wanda: first 1100 docs of c4-validation.00000-of-00008, 256 windows"),
    "bundled": Protocol("bundled", "bundled", "test", "",
                        reference="PruneLab: bundled Austen test split (Persuasion)"),
    "bundled-val": Protocol("bundled-val", "bundled", "validation", "",
                            reference="PruneLab: bundled Austen validation split (Northanger Abbey)"),
}


def resolve_protocol(entry: str) -> Protocol:
    """A preset name, or a path to a local text file (protocol ``text:<file name>``)."""
    if entry in PROTOCOLS:
        return PROTOCOLS[entry]
    path = Path(entry).expanduser()
    if path.is_file():
        return Protocol(f"text:{path.name}", "text", "test", "", path=str(path), reference=f"local text {path}")
    raise ValueError(f"eval.ppl.datasets entry '{entry}' is neither a protocol ({', '.join(PROTOCOLS)}) nor an existing file")


def protocol_windows(tokenizer, protocol: Protocol, seqlen: int, dataset_root: str | None = None,
                     max_windows: int | None = None):
    """Token windows ``[n, seqlen]`` of a protocol (the first ``max_windows`` if given), plus provenance."""
    if protocol.source in ("bundled", "text"):
        text, prov = corpora.read_text(protocol.source, protocol.split, protocol.path)
    else:
        docs, prov = corpora.hub_documents(protocol.source, protocol.split, dataset_root)
        if protocol.max_docs is not None:
            docs = docs[: protocol.max_docs]
        text = protocol.join.join(docs)
    tokens = corpora.tokenize_text(tokenizer, text)
    n = tokens.numel() // seqlen
    for cap in (protocol.max_windows, max_windows):
        if cap is not None:
            n = min(n, cap)
    if n == 0:
        raise ValueError(f"protocol {protocol.name}: {tokens.numel()} tokens, fewer than one window of {seqlen}")
    ids = tokens[: n * seqlen].view(n, seqlen)
    prov = {**prov, "tokens_sha256": corpora.tokens_digest(ids), "windows": n, "windows_cap": max_windows, "seqlen": seqlen,
            "tokens": n * seqlen, **{k: v for k, v in asdict(protocol).items() if v is not None}}
    return ids, prov


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each window: ``[b]`` (logits ``[b, L, V]``)."""
    logits = logits[:, :-1].float()
    targets = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).mean(dim=1)


def choose_mode(model, device, mode: str) -> str:
    """``full`` (whole model on the device) when it fits, else ``sequential`` (one block at a time)."""
    if store_of(model).onloaded:  # (its blocks exist one at a time)
        return "sequential"
    if mode != "auto":
        return mode
    if not str(device).startswith("cuda"):
        return "full"
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return "full" if size < 0.7 * free else "sequential"


@torch.no_grad()
def perplexity(model, adapter, ids: torch.Tensor, device="cpu", batch_size: int = 1, mode: str = "auto",
               desc: str = "ppl", progress: bool = True) -> float:
    """Perplexity of ``ids`` windows; ``mode`` full or sequential gives the same number."""
    mode = choose_mode(model, device, mode)
    nll = []
    if mode == "full":
        with on_device(model, device):
            for start in tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
                batch = ids[start : start + batch_size].to(device)
                nll.append(window_nll(model(input_ids=batch, use_cache=False).logits, batch).cpu())
    elif mode == "sequential":
        inputs = capture_block_inputs(model, adapter, ids, device, batch_size)
        outputs = run_blocks(adapter, inputs, device, progress, desc)
        with on_device(adapter.post_block_modules(), device):
            for start, hidden in zip(range(0, ids.shape[0], batch_size), outputs, strict=True):
                batch = ids[start : start + batch_size].to(device)
                nll.append(window_nll(adapter.head(hidden), batch).cpu())
    else:
        raise ValueError(f"eval.ppl.mode='{mode}' is not one of: auto, full, sequential")
    return math.exp(torch.cat(nll).double().mean().item())
