"""Tests for utils.data: the shipped datasets and their readers."""
from __future__ import annotations

import hashlib
import json

import pytest

from utils import data
from utils.paths import DATA_DIR, REBUILD_DATA_COMMAND


@pytest.fixture(scope="module")
def docs():
    return data.load_python_docs()


def test_kjv_verses():
    verses = data.load_kjv_verses()
    assert verses.column_names == ["book", "chapter", "verse", "text"]
    assert len(verses) == 31_102
    assert len(set(verses["book"])) == 66
    first, last = verses[0], verses[-1]
    assert (first["book"], first["chapter"], first["verse"]) == ("Genesis", 1, 1)
    assert first["text"] == "In the beginning God created the heaven and the earth."
    assert (last["book"], last["chapter"], last["verse"]) == ("Revelation", 22, 21)


def test_kjv_text():
    text = data.load_kjv_text()
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert text.count("\n") == 31_102


def test_movie_reviews():
    reviews = data.load_movie_reviews()
    assert reviews.column_names == ["id", "score", "text"]
    assert len(reviews) == 10_605
    assert reviews[0]["id"] == "1" and reviews[0]["score"] == 2.26666666667
    assert reviews[0]["text"].startswith("The Rock is destined to be the 21st Century's new ''Conan''")
    assert all(-4 <= s <= 4 for s in reviews["score"])
    assert len(set(reviews["id"])) == len(reviews)
    assert all(reviews["text"])


def test_python_docs(docs):
    assert docs.column_names == ["doc_id", "page", "title", "section", "url", "text"]
    assert len(docs) > 10_000
    assert len(set(docs["doc_id"])) == len(docs)
    zip_doc = docs[docs["doc_id"].index("library/functions#zip")]
    assert zip_doc["url"] == "https://docs.python.org/3.11/library/functions.html#zip"
    assert zip_doc["section"].startswith("zip(")
    assert "Iterate over several iterables in parallel" in zip_doc["text"]
    assert not any("¶" in t for t in docs["text"])


def test_python_faq(docs):
    faq = data.load_python_faq()
    assert faq.column_names == ["qa_id", "question", "answer", "page", "url", "doc_id"]
    assert 150 <= len(faq) <= 200
    text_by_id = dict(zip(docs["doc_id"], docs["text"]))
    for pair in faq:
        assert pair["page"].startswith("faq/")
        assert text_by_id[pair["doc_id"]] == pair["answer"]


def test_manifest_matches_files():
    manifest = json.loads((DATA_DIR / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"kjv.tsv.gz", "manpages.jsonl.gz", "movie_reviews.tsv",
                                      "python_docs.jsonl.gz", "python_faq.jsonl",
                                      "retrieval_generations.jsonl.gz"}
    for name, entry in manifest["files"].items():
        blob = (DATA_DIR / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == entry["sha256"], name
        assert len(blob) == entry["bytes"]
        assert entry["source"]["packages"][0]["version"]


@pytest.mark.parametrize("loader", [data.load_kjv_text, data.load_kjv_verses,
                                    data.load_movie_reviews, data.load_python_docs,
                                    data.load_python_faq])
def test_missing_file_names_rebuild_command(loader, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        loader(data_dir=tmp_path)
    assert REBUILD_DATA_COMMAND in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_python_faq_split_is_fixed_disjoint_and_complete():
    from utils.data import python_faq_split

    test, train = python_faq_split("test"), python_faq_split("train")
    assert len(test) == 100 and len(train) == 79
    assert not {r["qa_id"] for r in test} & {r["qa_id"] for r in train}
    assert [r["qa_id"] for r in python_faq_split("test")] == [r["qa_id"] for r in test]
    assert python_faq_split("test", seed=1) != test
    with pytest.raises(ValueError, match="split must be"):
        python_faq_split("dev")
    with pytest.raises(ValueError, match="n_test"):
        python_faq_split("test", n_test=0)
