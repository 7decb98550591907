"""Regenerate the bundled offline multiple-choice tasks from the bundled test split (Persuasion).

    python -m evaluators.tasks.build_tasks [--items 250] [--seed 0]

Writes ``evaluators/tasks/prunelab/austen_next.jsonl`` and ``austen_cloze.jsonl`` (one item a line:
``{"id", "context", "choices", "label", "line"}``, ``line`` = 0-based line of ``corpora/austen/test.txt``).
The output depends only on the corpus file, ``--items`` and ``--seed`` (no model, no tokenizer), so the
shipped files can be checked by re-running this script (``--check`` compares instead of writing).

Tasks (4 choices each, gold position drawn at random; the continuation lm-eval scores is " " + choice):

- ``austen_next``: what comes next, HellaSwag-style. The context is a sentence of 7-45 words without
  its last 2-4 words (behind the previous sentence of the paragraph when both fit in 200 characters);
  the choices are the true ending and the endings of three other sentences (cut the same way) of
  similar length (within 20% characters) from paragraphs at least 100 lines away.
- ``austen_cloze``: the context is a sentence of 6-40 words (behind the previous sentence when it has
  fewer than 12) without its final word; the choices are that word and three other words of similar
  frequency in the book (lowercase occurrences within a factor of 2 of the gold word's).

Trained 1M-parameter models score 0.37-0.47 (next) and 0.57-0.71 (cloze) acc; chance is 0.25.
"""

from __future__ import annotations

import argparse
import bisect
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "corpora" / "austen" / "test.txt"
OUT_DIR = Path(__file__).resolve().parent / "prunelab"

# a sentence ends at . ! or ? (optionally followed by closing quotes) before whitespace and an
# upper-case letter, possibly behind an opening quote
_BOUNDARY = re.compile(r"(?<=[.!?])([\"']?)\s+(?=[\"']?[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")
_LAST_WORD = re.compile(r"^(.*\S)\s+([a-z]{3,})([.!?]+[\"']?)$")


def sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences (collapsed whitespace)."""
    text = " ".join(paragraph.split())
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.start() + len(m.group(1))
        out.append(text[start:end])
        start = m.end()
    out.append(text[start:])
    return [s for s in out if s]


def read_corpus(path: Path = CORPUS) -> list[tuple[int, list[str]]]:
    """(line number, sentences) for every non-empty paragraph with real prose (headings dropped)."""
    paragraphs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        line = line.strip()
        if len(line) < 40:  # "Chapter 3", title lines, short interjections
            continue
        paragraphs.append((number, sentences(line)))
    return paragraphs


def _shuffle_choices(rng: random.Random, gold: str, distractors: list[str]) -> tuple[list[str], int]:
    label = rng.randrange(len(distractors) + 1)
    choices = list(distractors)
    choices.insert(label, gold)
    return choices, label


def _cut(sentence: str, rng: random.Random) -> tuple[str, str] | None:
    """Split a sentence of 7-45 words before its last 2-4 words: (beginning, ending)."""
    words = sentence.split(" ")
    if not 7 <= len(words) <= 45:
        return None
    k = len(words) - rng.randint(2, 4)
    return " ".join(words[:k]), " ".join(words[k:])


def build_next(paragraphs, n_items: int, rng: random.Random) -> list[dict]:
    cut = []  # (line, sentence index, sentences, beginning, ending) for every usable sentence
    for number, sents in paragraphs:
        for i, sent in enumerate(sents):
            parts = _cut(sent, rng)
            if parts and 6 <= len(parts[1]) <= 40:
                cut.append((number, i, sents, *parts))
    picked = sorted(rng.sample(range(len(cut)), min(n_items, len(cut))))
    items = []
    for k in picked:
        number, i, sents, beginning, ending = cut[k]
        context = beginning
        if i >= 1 and len(sents[i - 1]) + len(beginning) <= 200:
            context = sents[i - 1] + " " + beginning
        similar = sorted({e for n, _, _, _, e in cut if abs(n - number) >= 100 and e != ending
                          and abs(len(e) - len(ending)) <= 0.2 * len(ending)})
        choices, label = _shuffle_choices(rng, ending, rng.sample(similar, 3))
        items.append({"id": len(items), "context": context, "choices": choices, "label": label, "line": number})
    return items


def build_cloze(paragraphs, n_items: int, rng: random.Random) -> list[dict]:
    # lowercase occurrences only: names ("Rooke") never become distractors
    counts = Counter(w for _, sents in paragraphs for s in sents for w in _WORD.findall(s) if w.islower())
    by_count = sorted((c, w) for w, c in counts.items() if len(w) >= 3)  # (count, word), ascending
    keys = [c for c, _ in by_count]
    candidates = []
    for number, sents in paragraphs:
        for i, sent in enumerate(sents):
            m = _LAST_WORD.match(sent)
            n_words = len(sent.split())
            if not m or not 6 <= n_words <= 40:
                continue
            context, word = m.group(1), m.group(2)
            if n_words < 12 and i >= 1 and len(sents[i - 1]) <= 200:
                context = sents[i - 1] + " " + context
            lo, hi = bisect.bisect_left(keys, counts[word] / 2), bisect.bisect_right(keys, counts[word] * 2)
            if hi - lo < 4:  # the word itself + 3 others
                continue
            candidates.append((number, context, word, lo, hi))
    picked = sorted(rng.sample(range(len(candidates)), min(n_items, len(candidates))))
    items = []
    for k in picked:
        number, context, word, lo, hi = candidates[k]
        band = [w for _, w in by_count[lo:hi] if w != word]
        choices, label = _shuffle_choices(rng, word, rng.sample(band, 3))
        items.append({"id": len(items), "context": context, "choices": choices, "label": label, "line": number})
    return items


def build(n_items: int = 250, seed: int = 0) -> dict[str, list[dict]]:
    paragraphs = read_corpus()
    return {
        "austen_next": build_next(paragraphs, n_items, random.Random(f"austen_next:{seed}")),
        "austen_cloze": build_cloze(paragraphs, n_items, random.Random(f"austen_cloze:{seed}")),
    }


def dumps(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=250, help="items per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="compare with the shipped files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, items in build(args.items, args.seed).items():
        path = OUT_DIR / f"{name}.jsonl"
        text = dumps(items)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
            continue
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(items)} items, {len(text.encode()):,} bytes")
    if stale:
        print(f"out of date: {', '.join(stale)} (run python -m evaluators.tasks.build_tasks)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
