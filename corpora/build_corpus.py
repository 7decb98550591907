"""Regenerate the bundled public-domain corpus (``corpora/austen/*.txt``).

Source: Debian's ``r-cran-janeaustenr`` package (MIT packaging; the six Jane Austen novels are in
the public domain). The novels are stored as R serialized data (``Rdata.rdx`` index + ``Rdata.rdb``
blobs); we read them with the pure-Python ``rdata`` package, so R is not needed.

Normalisation (docs/environment.md §3, "un-wraps each paragraph"): the package's lines are hard-wrapped
at ~70 characters; we un-wrap each paragraph onto one line and separate paragraphs by a blank line,
which is the shape of WikiText-style evaluation text.

Splits (by novel, so that validation and test text is never seen in training):
  train      = Emma, Mansfield Park, Pride and Prejudice, Sense and Sensibility
  validation = Northanger Abbey
  test       = Persuasion

Usage::

    pip install rdata && python -m corpora.build_corpus [--deb PATH]

Without ``--deb`` the script runs ``apt-get download r-cran-janeaustenr`` in a temporary folder.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "austen"
SPLITS = {
    "train": ["emma", "mansfieldpark", "prideprejudice", "sensesensibility"],
    "validation": ["northangerabbey"],
    "test": ["persuasion"],
}


def _rdata_dir(deb: Path | None, workdir: Path) -> Path:
    if deb is None:
        subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=workdir, check=True)
        deb = next(workdir.glob("r-cran-janeaustenr_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "x")], check=True)
    return next((workdir / "x").rglob("janeaustenr/data"))


def _read_rdb(data_dir: Path) -> dict[str, list[str]]:
    """Read every object of an R lazy-load database (Rdata.rdx + Rdata.rdb) as a list of lines."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        offset, length = int(offset), int(length)
        raw = blob[offset : offset + length]
        # each entry: 4-byte big-endian uncompressed length, then a zlib stream of an RDS payload
        payload = zlib.decompress(raw[4:])
        value = rdata.conversion.convert(rdata.parser.parse_data(payload))
        novels[name] = [str(line) for line in list(value)]
    return novels


def unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines into one line per paragraph, paragraphs separated by a blank line."""
    paragraphs, current = [], []
    for line in lines:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def build(deb: Path | None = None, out_dir: Path = OUT_DIR) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        novels = _read_rdb(_rdata_dir(deb, Path(tmp)))
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"source": "Debian r-cran-janeaustenr (public-domain novels)", "splits": {}}
    for split, names in SPLITS.items():
        text = "\n".join(unwrap(novels[name]) for name in names)
        path = out_dir / f"{split}.txt"
        path.write_text(text, encoding="utf-8")
        manifest["splits"][split] = {
            "novels": names,
            "bytes": len(text.encode("utf-8")),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
    (out_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, default=None, help="a downloaded r-cran-janeaustenr .deb")
    args = parser.parse_args()
    print(json.dumps(build(args.deb), indent=2))
