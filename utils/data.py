"""Readers for the small datasets in ``data/`` (see ``data/README.md``).

Each loader takes an optional ``data_dir`` (default: the repository's
``data/``) and raises ``FileNotFoundError`` naming the rebuild command
when its file is missing.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets

from utils.paths import DATA_DIR, REBUILD_DATA_COMMAND


__all__ = [
    "data_file",
    "load_kjv_verses",
    "load_kjv_text",
    "load_movie_reviews",
    "load_python_docs",
    "load_python_faq",
    "python_faq_split",
]


def data_file(name: str, data_dir: Path | None = None) -> Path:
    """Path of ``data/<name>``; raises ``FileNotFoundError`` if it is missing."""
    path = Path(data_dir or DATA_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; rebuild data/ with `{REBUILD_DATA_COMMAND}` "
            "from the repository root")
    return path


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, gunzipped if its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as f:
        return f.read().splitlines()


def _read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a tab-separated file with a header line (no quoting)."""
    header, *lines = _read_lines(path)
    columns = header.split("\t")
    return [dict(zip(columns, line.split("\t"))) for line in lines]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read_lines(path)]


def load_kjv_verses(data_dir: Path | None = None) -> datasets.Dataset:
    """The King James Bible, one row per verse: ``book``, ``chapter``, ``verse``, ``text``."""
    rows = _read_tsv(data_file("kjv.tsv.gz", data_dir))
    for row in rows:
        row["chapter"], row["verse"] = int(row["chapter"]), int(row["verse"])
    return datasets.Dataset.from_list(rows)


def load_kjv_text(data_dir: Path | None = None) -> str:
    """The whole King James Bible as plain text, one verse per line."""
    rows = _read_tsv(data_file("kjv.tsv.gz", data_dir))
    return "".join(row["text"] + "\n" for row in rows)


def load_movie_reviews(data_dir: Path | None = None) -> datasets.Dataset:
    """10,605 movie-review snippets: ``id`` (str), ``score`` (mean human rating, −4..4), ``text``."""
    rows = _read_tsv(data_file("movie_reviews.tsv", data_dir))
    for row in rows:
        row["score"] = float(row["score"])
    return datasets.Dataset.from_list(rows)


def load_python_docs(data_dir: Path | None = None) -> datasets.Dataset:
    """Python 3.11 docs, one row per section: ``doc_id``, ``page``, ``title``, ``section``, ``url``, ``text``."""
    return datasets.Dataset.from_list(_read_jsonl(data_file("python_docs.jsonl.gz", data_dir)))


def load_python_faq(data_dir: Path | None = None) -> datasets.Dataset:
    """Python FAQ pairs: ``qa_id``, ``question``, ``answer``, ``page``, ``url``, ``doc_id``.

    ``doc_id`` names the row of :func:`load_python_docs` whose ``text`` is the answer.
    """
    return datasets.Dataset.from_list(_read_jsonl(data_file("python_faq.jsonl", data_dir)))


def python_faq_split(split: str, n_test: int = 100, seed: int = 0,
                     data_dir: Path | None = None) -> list[dict]:
    """One fixed split of the Python FAQ pairs for Part 5: ``"test"`` (``n_test`` held-out questions,
    never used to train or tune anything) or ``"train"`` (the rest, for training rerankers and graders
    and for choosing settings). The split is a seeded shuffle, so every chapter gets the same one."""
    import random

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rows = list(load_python_faq(data_dir))
    if not 0 < n_test < len(rows):
        raise ValueError(f"n_test must be between 1 and {len(rows) - 1}, got {n_test}")
    order = random.Random(seed).sample(range(len(rows)), len(rows))
    test_ids = set(order[:n_test])
    return [r for i, r in enumerate(rows) if (i in test_ids) == (split == "test")]
