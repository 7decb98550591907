"""Perplexity protocols: the arithmetic, the windows, and the hub-source loading code on local mirrors."""

import gzip
import json
import math

import pytest
import torch

import corpora
from evaluators.ppl import PROTOCOLS, perplexity, protocol_windows, resolve_protocol

from .conftest import load_tiny


def test_bundled_protocol_equals_an_independent_computation():
    loaded = load_tiny("tiny-opt")
    tok = loaded.tokenizer
    ids, prov = protocol_windows(tok, PROTOCOLS["bundled"], 128, max_windows=24)
    ours = perplexity(loaded.model, loaded.adapter, ids, batch_size=5, progress=False)
    # independently: tokenize the raw file, cut 128-token windows, and let transformers compute the loss
    text = (corpora.BUNDLED_DIR / "test.txt").read_text(encoding="utf-8")
    tokens = tok(text, return_tensors="pt").input_ids[0]
    losses = []
    with torch.no_grad():
        for i in range(24):
            window = tokens[i * 128 : (i + 1) * 128].unsqueeze(0)
            losses.append(loaded.model(input_ids=window, labels=window).loss.item())
    assert ours == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert prov["windows"] == 24 and prov["tokens"] == 24 * 128 and prov["split"] == "test"


def test_local_text_protocol_and_remainder_dropped(tmp_path):
    loaded = load_tiny("tiny-llama")
    path = tmp_path / "my_test.txt"
    path.write_text("It is a truth universally acknowledged. " * 60)
    protocol = resolve_protocol(str(path))
    assert protocol.name == "text:my_test.txt"
    ids, prov = protocol_windows(loaded.tokenizer, protocol, 50)
    total = len(loaded.tokenizer(path.read_text())["input_ids"])
    assert ids.shape == (total // 50, 50) and prov["sha256"]


def test_unknown_protocol_entry_is_rejected():
    with pytest.raises(ValueError, match="neither a protocol"):
        resolve_protocol("wikitext3")


@pytest.fixture(scope="module")
def hub_mirror(tmp_path_factory):
    """An offline mirror with the hub layouts the reference loaders use (c4 json.gz shards, wikitext & ptb configs)."""
    root = tmp_path_factory.mktemp("mirror")
    paragraphs = [p for p in (corpora.BUNDLED_DIR / "validation.txt").read_text().split("\n\n") if p.strip()]
    c4 = root / "allenai" / "c4" / "en"
    c4.mkdir(parents=True)
    for name, docs in (("c4-train.00000-of-01024.json.gz", paragraphs[:400]),
                       ("c4-validation.00000-of-00008.json.gz", paragraphs[:1200])):
        with gzip.open(c4 / name, "wt") as f:
            for d in docs:
                f.write(json.dumps({"text": d, "timestamp": "", "url": ""}) + "\n")

    def with_config(folder, config, field, splits):
        folder.mkdir(parents=True)
        files = []
        for split, rows in splits.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({field: r}) + "\n" for r in rows))
            files.append(f"    - split: {split}\n      path: {split}.jsonl")
        (folder / "README.md").write_text(f"---\nconfigs:\n  - config_name: {config}\n    data_files:\n"
                                          + "\n".join(files) + "\n---\n")

    with_config(root / "wikitext", "wikitext-2-raw-v1", "text",
                {"train": paragraphs[:300], "validation": paragraphs[300:350], "test": paragraphs[350:450]})
    with_config(root / "ptb-text-only" / "ptb_text_only", "penn_treebank", "sentence",
                {"train": paragraphs[:50], "validation": paragraphs[50:100], "test": paragraphs[100:200]})
    return root, paragraphs


def test_c4_protocol_uses_first_1100_docs_joined_by_space_and_256_windows(hub_mirror):
    root, paragraphs = hub_mirror
    tok = load_tiny("tiny-opt").tokenizer
    ids, prov = protocol_windows(tok, PROTOCOLS["c4"], 16, dataset_root=str(root))
    expected = torch.tensor(tok(" ".join(paragraphs[:1100]))["input_ids"])
    assert ids.shape == (256, 16)  # truncated to 256 windows
    assert torch.equal(ids.flatten(), expected[: 256 * 16])
    assert prov["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


@pytest.mark.parametrize("name,split,join", [("wikitext2", slice(350, 450), "\n\n"), ("ptb", slice(100, 200), " "),
                                             ("ptb-val", slice(50, 100), "\n\n")])
def test_wikitext_and_ptb_protocols_join_as_the_references(hub_mirror, name, split, join):
    root, paragraphs = hub_mirror
    tok = load_tiny("tiny-opt").tokenizer
    ids, prov = protocol_windows(tok, PROTOCOLS[name], 64, dataset_root=str(root))
    expected = torch.tensor(tok(join.join(paragraphs[split]))["input_ids"])
    n = expected.numel() // 64
    assert torch.equal(ids, expected[: n * 64].view(n, 64))


def test_c4_calibration_samples_documents_longer_than_seqlen(hub_mirror):
    root, paragraphs = hub_mirror
    tok = load_tiny("tiny-opt").tokenizer
    a = corpora.calibration_windows(tok, "c4", 8, 32, seed=0, dataset_root=str(root))
    b = corpora.calibration_windows(tok, "c4", 8, 32, seed=0, dataset_root=str(root))
    c = corpora.calibration_windows(tok, "c4", 8, 32, seed=1, dataset_root=str(root))
    assert a.ids.shape == (8, 32) and torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.provenance["tokens_sha256"] == b.provenance["tokens_sha256"]
    docs = [tok(p)["input_ids"] for p in paragraphs[:400]]
    for window in a.ids.tolist():  # each window lies inside one long-enough training document
        assert any(len(d) > 32 and any(d[j : j + 32] == window for j in range(len(d) - 31)) for d in docs)


def test_wikitext2_calibration_joins_train_with_space(hub_mirror):
    root, paragraphs = hub_mirror
    tok = load_tiny("tiny-opt").tokenizer
    w = corpora.calibration_windows(tok, "wikitext2", 4, 32, seed=0, dataset_root=str(root))
    stream = tok(" ".join(paragraphs[:300]))["input_ids"]
    for window in w.ids.tolist():
        assert any(stream[j : j + 32] == window for j in range(len(stream) - 31))
    assert w.provenance["split"] == "train" and w.provenance["config"] == "wikitext-2-raw-v1"
