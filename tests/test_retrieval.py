"""The Part 5 retrieval toolkit: chunkers, load_folder, BM25/dense/hybrid indexes, reranking, metrics."""
import warnings

import bm25s
import numpy as np
import pytest

from utils import retrieval as R
from utils.retrieval import (BM25Index, Chunk, DenseIndex, Hit, HybridIndex, RerankedIndex, chunk_fixed,
                             chunk_recursive, deduplicate_chunks, embedding_text, evaluate_retrieval,
                             load_folder, rerank, rrf_fuse,
                             sections_as_chunks, tokenize)

DOCS = [
    {"doc_id": "indent", "title": "Design FAQ",
     "text": "Python uses indentation to group statements. There are no begin/end brackets."},
    {"doc_id": "strings", "title": "Design FAQ",
     "text": "Strings are immutable. Immutable strings can be used as dictionary keys."},
    {"doc_id": "gil", "title": "Library FAQ",
     "text": "The global interpreter lock (GIL) lets one thread run Python bytecode at a time."},
    {"doc_id": "lambda", "title": "Programming FAQ",
     "text": "Lambdas defined in a loop all return the same value because of late binding."},
]


def chunks_of(docs=DOCS, groups=None):
    return sections_as_chunks(docs, groups=groups)


def bag_embedder(vocab=("python", "strings", "immutable", "thread", "lock", "lambda", "loop", "secret")):
    """A deterministic stand-in for MiniLM: normalised counts of a few words."""
    def embed(texts):
        rows = np.array([[tokenize(t).count(w) for w in vocab] for t in texts], dtype=np.float32) + 1e-3
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return embed


def dense(chunks, **kw):
    embed = bag_embedder()
    return DenseIndex(chunks, embed([embedding_text(c) for c in chunks]), embed_query=embed, **kw)


# ----------------------------------------------------------------------------- records and text rules

def test_chunk_and_hit_records_validate_and_normalise_groups():
    c = Chunk("a#0", "a", "text", groups="staff")
    assert c.groups == frozenset({"staff"}) and Chunk("b#0", "b", "t").groups == frozenset({"public"})
    assert Hit(c, 1.0, 1).rank == 1
    with pytest.raises(TypeError, match="Chunk.text must be a str"):
        Chunk("a#0", "a", None)
    with pytest.raises(ValueError, match="must not be empty"):
        Chunk("", "a", "t")
    with pytest.raises(TypeError, match="iterable of str"):
        Chunk("a#0", "a", "t", groups=3)
    with pytest.raises(TypeError, match="only str group names"):
        Chunk("a#0", "a", "t", groups={1})


def test_tokenize_is_a_lower_case_word_regex_for_queries_and_documents():
    assert tokenize("How do I use os.path.join() in __init__? Ünïcode!") == [
        "how", "do", "i", "use", "os", "path", "join", "in", "__init__", "ünïcode"]
    assert tokenize("   ") == []
    with pytest.raises(TypeError):
        tokenize(None)
    assert R.count_words(" a  b\nc ") == 3


def test_embedding_text_is_title_blank_line_text():
    assert embedding_text(Chunk("a#0", "a", "body", title="Head")) == "Head\n\nbody"
    assert embedding_text(Chunk("a#0", "a", "body")) == "body"
    with pytest.raises(TypeError, match="takes a Chunk"):
        embedding_text("body")


# ------------------------------------------------------------------------------------------ chunkers

def test_sections_as_chunks_one_per_record_with_page_title_and_groups():
    docs = DOCS + [{"doc_id": "blank", "text": "  \n"}, {"doc_id": "own", "text": "x", "groups": ["hr"]}]
    chunks = sections_as_chunks(docs)
    assert [c.chunk_id for c in chunks] == ["indent#0", "strings#0", "gil#0", "lambda#0", "own#0"]
    assert chunks[0].title == "Design FAQ" and chunks[-1].groups == frozenset({"hr"})
    assert all(c.groups == {"staff"} for c in sections_as_chunks(DOCS, groups="staff"))
    by_fn = sections_as_chunks(DOCS, groups=lambda d: {"a", d["doc_id"]})
    assert by_fn[1].groups == {"a", "strings"}
    with pytest.raises(TypeError, match="list of documents"):
        sections_as_chunks(DOCS[0])
    with pytest.raises(ValueError, match="'doc_id' and 'text'"):
        sections_as_chunks([{"text": "no id"}])
    with pytest.raises(TypeError, match="non-str text"):
        sections_as_chunks([{"doc_id": "x", "text": 3}])


def test_chunk_fixed_windows_overlap_and_keep_line_breaks():
    doc = {"doc_id": "d", "title": "T", "text": "w0 w1 w2\nw3 w4 w5 w6"}
    plain = chunk_fixed([doc], size=3)
    assert [c.text for c in plain] == ["w0 w1 w2", "w3 w4 w5", "w6"]
    assert [c.chunk_id for c in plain] == ["d#0", "d#1", "d#2"] and plain[0].title == "T"
    overlapped = chunk_fixed([doc], size=3, overlap=1)
    assert [c.text for c in overlapped] == ["w0 w1 w2", "w2\nw3 w4", "w4 w5 w6"]
    assert [c.text for c in chunk_fixed([doc], size=10)] == [doc["text"]]
    assert chunk_fixed([{"doc_id": "e", "text": ""}], size=3) == []
    for bad in ({"size": 0}, {"size": 3, "overlap": 3}, {"size": 3, "overlap": -1}, {"size": 2.5}):
        with pytest.raises(ValueError):
            chunk_fixed([doc], **bad)


def test_chunk_recursive_prefers_headings_then_paragraphs_then_sentences_then_words():
    text = ("# One\nalpha beta gamma.\n\nSecond paragraph here.\n"
            "# Two\nA first sentence. A second sentence! " + " ".join(f"w{i}" for i in range(9)))
    chunks = chunk_recursive([{"doc_id": "d", "text": text, "title": "T"}], max_tokens=5)
    assert all(R.count_words(c.text) <= 5 for c in chunks) and chunks[0].title == "T"
    assert [c.text for c in chunks] == ["# One\nalpha beta gamma.", "Second paragraph here.",
                                        "# Two\nA first sentence.", "A second sentence!",
                                        "w0 w1 w2 w3 w4", "w5 w6 w7 w8"]
    assert " ".join(c.text for c in chunks).split() == text.split()  # nothing lost or reordered
    # a document that fits stays whole, blank ones are skipped, small neighbours merge
    whole = chunk_recursive([{"doc_id": "s", "text": " short text "}, {"doc_id": "b", "text": ""}], 50)
    assert [(c.chunk_id, c.text) for c in whole] == [("s#0", "short text")]
    merged = chunk_recursive([{"doc_id": "p", "text": "a b.\n\nc d.\n\ne f g h i."}], 4)
    assert [c.text for c in merged] == ["a b.\n\nc d.", "e f g h", "i."]
    assert [c.chunk_id for c in merged] == ["p#0", "p#1", "p#2"]
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_recursive(DOCS, 0)


def test_chunk_recursive_splits_an_overlong_sentence_into_word_windows():
    doc = {"doc_id": "d", "text": "one two three four five six seven"}
    assert [c.text for c in chunk_recursive([doc], 3)] == ["one two three", "four five six", "seven"]


def test_deduplicate_chunks_keeps_the_first_of_equal_texts():
    a, b = Chunk("a#0", "a", "Same  text\n"), Chunk("b#0", "b", "Same text")
    c = Chunk("c#0", "c", "Same text", title="Other")
    assert deduplicate_chunks([a, b, c]) == [a, c]


# --------------------------------------------------------------------------------------- load_folder

def test_load_folder_reads_sorted_utf8_replaces_bad_bytes_and_skips_duplicates(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("Strings are immutable.", encoding="utf-8")
    (tmp_path / "a.txt").write_bytes("\ufeffThe GIL: one thread at a time.".encode())
    (tmp_path / "sub" / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "z_copy.txt").write_text("Strings  are immutable.\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("# not matched", encoding="utf-8")
    with pytest.warns(UserWarning) as record:
        docs = load_folder(tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "sub/latin.txt is not valid UTF-8" in messages and "U+FFFD" in messages
    assert "z_copy.txt, a duplicate of b.txt" in messages
    assert [d["doc_id"] for d in docs] == ["a.txt", "b.txt", "sub/latin.txt"]
    assert docs[0]["text"].startswith("The GIL") and docs[0]["title"] == "a"
    assert docs[2]["text"] == "caf\ufffd au lait" and docs[2]["path"].endswith("latin.txt")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        kept = load_folder(tmp_path, deduplicate=False)
    assert len(kept) == 4


def test_load_folder_strict_skip_and_bad_arguments(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00oops")
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8.*errors='replace'"):
        load_folder(tmp_path, errors="strict")
    with pytest.warns(UserWarning, match="skipped bad.txt"):
        assert [d["doc_id"] for d in load_folder(tmp_path, errors="skip")] == ["good.txt"]
    with pytest.raises(ValueError, match="errors must be"):
        load_folder(tmp_path, errors="ignore")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"no file .* matches '\*\*/\*.md'"):
        load_folder(tmp_path, pattern="**/*.md")


# -------------------------------------------------------------------------------------------- BM25

def test_bm25_scores_equal_bm25s_lucene():
    corpus = chunks_of() + [Chunk(f"x{i}#0", f"x{i}", t) for i, t in enumerate(
        ["python python python lock", "a very long text about strings " * 5, "thread thread"])]
    index = BM25Index(corpus, k1=1.2, b=0.8)
    lib = bm25s.BM25(method="lucene", k1=1.2, b=0.8)
    lib.index([tokenize(embedding_text(c)) for c in corpus], show_progress=False)
    for query in ["Why are strings immutable?", "python thread lock lock", "GIL", "unknownword python"]:
        np.testing.assert_allclose(index.scores(query), lib.get_scores(tokenize(query)), rtol=1e-5, atol=1e-6)


def test_bm25_ranks_the_matching_chunk_first_and_handles_edge_cases():
    index = BM25Index(chunks_of())
    hits = index.search("Why are strings immutable?", k=2)
    assert [h.chunk.doc_id for h in hits] == ["strings", "indent"]
    assert [h.rank for h in hits] == [1, 2] and hits[0].score > hits[1].score
    assert len(index.search("strings", k=100)) == len(index) == 4  # k > corpus: every chunk
    zero = index.search("zzz qqq", k=3)  # no shared term: all zero, corpus order
    assert [h.chunk.doc_id for h in zero] == ["indent", "strings", "gil"] and zero[0].score == 0
    for bad_query in ["", "   \n\t"]:
        with pytest.raises(ValueError, match="empty or only whitespace"):
            index.search(bad_query)
    with pytest.raises(TypeError, match="query must be a str"):
        index.search(None)
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search("strings", k=0)
    with pytest.raises(ValueError, match="k1 >= 0"):
        BM25Index(chunks_of(), b=2)


def test_empty_corpus_and_bad_chunks_fail_at_construction():
    for cls in (BM25Index, lambda c: DenseIndex(c, np.zeros((0, 3)))):
        with pytest.raises(ValueError, match="got no chunks"):
            cls([])
    with pytest.raises(TypeError, match="takes Chunk objects"):
        BM25Index(["text"])
    with pytest.raises(ValueError, match="occurs 2 times"):
        BM25Index([Chunk("a#0", "a", "x"), Chunk("a#0", "b", "y")])
    with pytest.raises(ValueError, match="got no chunks"):
        BM25Index(sections_as_chunks([{"doc_id": "b", "text": " "}]))


def test_duplicates_are_kept_by_indexes_with_equal_scores_earlier_first():
    chunks = chunks_of() + [Chunk("strings-copy#0", "strings-copy", DOCS[1]["text"], title="Design FAQ")]
    for index in (BM25Index(chunks), dense(chunks)):
        top = index.search("immutable strings", k=2)
        assert [h.chunk.chunk_id for h in top] == ["strings#0", "strings-copy#0"]
        assert top[0].score == pytest.approx(top[1].score)
    assert len(deduplicate_chunks(chunks)) == 4


def test_bm25_ties_at_the_cut_are_broken_by_corpus_order():
    chunks = [Chunk(f"d{i}#0", f"d{i}", "same words here") for i in range(6)]
    hits = BM25Index(chunks).search("words", k=3)
    assert [h.chunk.chunk_id for h in hits] == ["d0#0", "d1#0", "d2#0"]


# ------------------------------------------------------------------------------------ access control

def restricted_corpus():
    public = [{**d, "groups": {"public"}} for d in DOCS]
    secret = {"doc_id": "salaries", "title": "HR", "groups": {"hr"},
              "text": "Why are strings immutable? Secret: immutable strings salaries table strings."}
    return sections_as_chunks(public + [secret])


@pytest.mark.parametrize("make", [BM25Index, dense, lambda c: HybridIndex([BM25Index(c), dense(c)])])
def test_allowed_groups_filter_before_top_k(make):
    index = make(restricted_corpus())
    query = "Why are strings immutable? secret"
    assert index.search(query, k=1)[0].chunk.doc_id == "salaries"  # the best match overall...
    hits = index.search(query, k=4, allowed_groups={"public"})
    assert "salaries" not in [h.chunk.doc_id for h in hits]       # ...is never shown to the public
    assert len(hits) == 4 and [h.rank for h in hits] == [1, 2, 3, 4]  # and they still get k results
    assert hits[0].chunk.doc_id == "strings"
    assert [h.chunk.doc_id for h in index.search(query, k=9, allowed_groups="hr")] == ["salaries"]
    assert index.search(query, k=3, allowed_groups=set()) == []
    assert len(index.search(query, k=9, allowed_groups=["public", "hr"])) == 5


def test_group_mask_is_cached_and_validated():
    index = BM25Index(restricted_corpus())
    assert index.allowed_mask(None) is None
    assert index.allowed_mask({"hr"}) is index.allowed_mask(["hr"])
    with pytest.raises(TypeError, match="allowed_groups"):
        index.search("strings", allowed_groups=5)


# ------------------------------------------------------------------------------------------- dense

def test_dense_index_embeds_queries_once_and_validates_shapes():
    calls = []
    base = bag_embedder()

    def embed(texts):
        calls.append(list(texts))
        return base(texts)

    chunks = chunks_of()
    index = DenseIndex(chunks, base([embedding_text(c) for c in chunks]), embed_query=embed)
    assert index.search("strings immutable", k=1)[0].chunk.doc_id == "strings"
    index.search("strings immutable", k=2)
    index.embed_queries(["thread lock", "strings immutable", "thread lock"])
    assert calls == [["strings immutable"], ["thread lock"]]
    uncached = DenseIndex(chunks, index.embeddings, embed_query=embed, cache_queries=False)
    np.testing.assert_array_equal(uncached.embed_queries(["a lock", "a lock"]), base(["a lock"] * 2))
    uncached.embed_queries(["a lock"])
    assert calls[-2:] == [["a lock"], ["a lock"]]
    with pytest.raises(ValueError, match=r"shape \(4, d\)"):
        DenseIndex(chunks, np.zeros((3, 8)))
    with pytest.raises(ValueError, match="both model and tokenizer"):
        DenseIndex(chunks, np.zeros((4, 8)), model=object())
    broken = DenseIndex(chunks, np.zeros((4, 8)), embed_query=lambda texts: np.zeros((len(texts), 5)))
    with pytest.raises(ValueError, match="query embeddings have shape"):
        broken.search("x")


def test_dense_index_with_minilm_embeds_embedding_text_through_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path))
    from utils.embed import embed_texts, embedding_cache_path

    chunks = chunks_of()
    index = DenseIndex(chunks)
    texts = [embedding_text(c) for c in chunks]
    assert embedding_cache_path(texts).is_file()  # shared with any chapter embedding the same texts
    np.testing.assert_array_equal(index.embeddings, embed_texts(texts))
    assert index.search("What is the global interpreter lock?", k=1)[0].chunk.doc_id == "gil"
    lambda_hit = index.search("Why do lambdas in a for loop return the same result?", k=1)[0]
    assert lambda_hit.chunk.doc_id == "lambda"


# ------------------------------------------------------------------------------- hybrid and rerank

def test_rrf_fuse_formula_and_ties():
    a, b, c = (Chunk(f"{x}#0", x, x) for x in "abc")
    fused = rrf_fuse([[Hit(a, 9, 1), Hit(b, 8, 2)], [Hit(b, 1, 1), Hit(c, 0.5, 2)]], k_rrf=60)
    assert [h.chunk.chunk_id for h in fused] == ["b#0", "a#0", "c#0"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61) and fused[1].score == pytest.approx(1 / 61)
    assert [h.rank for h in fused] == [1, 2, 3] and len(rrf_fuse([[Hit(a, 1, 1)]], k=0)) == 0
    with pytest.raises(ValueError, match="k_rrf"):
        rrf_fuse([], k_rrf=-1)


def test_hybrid_index_fuses_bm25_and_dense_and_validates():
    chunks = chunks_of()
    bm25, dn = BM25Index(chunks), dense(chunks)
    hybrid = HybridIndex([bm25, dn], k_rrf=60, depth=2)
    query = "Why are strings immutable?"
    want = rrf_fuse([bm25.search(query, k=2), dn.search(query, k=2)], 60, 2)
    assert [(h.chunk.chunk_id, h.score) for h in hybrid.search(query, k=2)] == \
        [(h.chunk.chunk_id, h.score) for h in want]
    assert len(hybrid.search(query, k=10)) == 4  # searches max(k, depth) deep
    with pytest.raises(ValueError, match="at least one index"):
        HybridIndex([])
    with pytest.raises(TypeError, match="search"):
        HybridIndex([object()])
    with pytest.raises(ValueError, match="k_rrf"):
        HybridIndex([bm25], k_rrf=-1)
    with pytest.raises(ValueError, match="empty"):
        hybrid.search(" ")


def by_length(query, chunks):
    return [-len(c.text) for c in chunks]  # shortest text first


def test_rerank_reorders_keeps_k_and_checks_the_scorer():
    hits = BM25Index(chunks_of()).search("python strings", k=4)
    out = rerank("q", hits, by_length, k=2)
    shortest = sorted(hits, key=lambda h: len(h.chunk.text))[:2]
    assert [h.chunk for h in out] == [h.chunk for h in shortest] and [h.rank for h in out] == [1, 2]
    assert out[0].score == -len(out[0].chunk.text)
    assert rerank("q", [], by_length, 3) == []
    assert [h.chunk for h in rerank("q", hits, lambda q, c: [0.0] * len(c), 4)] == [h.chunk for h in hits]
    with pytest.raises(ValueError, match="one score per chunk"):
        rerank("q", hits, lambda q, c: [1.0], 2)
    with pytest.raises(ValueError, match="k must be"):
        rerank("q", hits, by_length, 0)


def test_reranked_index_reranks_the_first_stage_candidates_only():
    chunks = restricted_corpus()
    index = RerankedIndex(BM25Index(chunks), by_length, candidates=2)
    first = BM25Index(chunks).search("strings immutable", k=2, allowed_groups={"public"})
    got = index.search("strings immutable", k=2, allowed_groups={"public"})
    assert {h.chunk.chunk_id for h in got} == {h.chunk.chunk_id for h in first}
    assert len(index.search("strings immutable", k=5)) == 5  # k > candidates: retrieves k
    with pytest.raises(TypeError, match="search"):
        RerankedIndex(object(), by_length)
    with pytest.raises(TypeError, match="scorer must be a function"):
        RerankedIndex(BM25Index(chunks), scorer=None)
    with pytest.raises(ValueError, match="candidates"):
        RerankedIndex(BM25Index(chunks), by_length, candidates=0)


def test_evaluate_retrieval_means_over_questions_with_index_or_function():
    index = BM25Index(restricted_corpus())
    questions = [{"question": "Why are strings immutable?", "doc_id": "strings"},
                 {"question": "What is the GIL thread lock?", "doc_id": "gil"},
                 {"question": "nothing matches zzz", "doc_id": "nowhere"}]
    got = evaluate_retrieval(index, questions, ks=(1, 3))
    assert set(got) == {"recall@1", "recall@3", "MRR"}
    assert got["recall@3"] == pytest.approx(2 / 3)
    assert got["MRR"] == pytest.approx((1 / 2 + 1) / 3)  # the secret HR chunk outranks "strings"
    public = evaluate_retrieval(index, questions, ks=(1,), allowed_groups={"public"})
    assert public["recall@1"] == pytest.approx(2 / 3) and public["MRR"] == pytest.approx(2 / 3)
    as_fn = evaluate_retrieval(lambda q, k: index.search(q, k=k), questions, ks=(1, 3))
    assert as_fn == got
    with pytest.raises(ValueError, match="no questions"):
        evaluate_retrieval(index, [])
    with pytest.raises(ValueError, match="at least one cut-off"):
        evaluate_retrieval(index, questions, ks=())
    with pytest.raises(ValueError, match="every k"):
        evaluate_retrieval(index, questions, ks=(0,))
    with pytest.raises(TypeError, match="search"):
        evaluate_retrieval(object(), questions)
    with pytest.raises(ValueError, match="'question' and 'doc_id'"):
        evaluate_retrieval(index, [{"q": "x"}])


# --------------------------------------------------------- structure-aware loading (chapter 5-05)

MARKDOWN = """# open(2)

Intro line.

## SYNOPSIS

```
#include <fcntl.h>

int open(const char *pathname, int flags);
```

## DESCRIPTION

The open() system call opens the file specified by pathname.

### Flags

O_APPEND
: The file is opened in append mode.

  Before each write, the offset is moved to the end.

O_CLOEXEC
: Enable the close-on-exec flag.

## ERRORS

EACCES
: Permission denied.
"""


def test_markdown_sections_keep_heading_paths_entries_and_whole_code_blocks():
    units = R.markdown_sections(MARKDOWN)
    paths = [u.path for u in units]
    assert paths == [("open(2)",), ("open(2)", "SYNOPSIS"), ("open(2)", "DESCRIPTION"),
                     ("open(2)", "DESCRIPTION", "Flags", "O_APPEND"),
                     ("open(2)", "DESCRIPTION", "Flags", "O_CLOEXEC"), ("open(2)", "ERRORS", "EACCES")]
    assert units[1].text.startswith("```") and "#include <fcntl.h>\n\nint open" in units[1].text
    assert units[3].kind == "entry" and "append mode.\n\nBefore each write" in units[3].text
    untitled = R.markdown_sections("Just text.\n\n## Part\n\nMore.", title="notes")
    assert [u.path for u in untitled] == [("notes",), ("notes", "Part")]
    with pytest.raises(TypeError, match="str"):
        R.markdown_sections(None)


HTML = """<html><head><title>zip docs</title><script>var x = 1;</script></head><body>
<nav>skip me</nav>
<h2>Built-in functions<a>¶</a></h2><p>Some <b>intro</b> text.</p>
<dl class="py class"><dt id="Foo">class Foo<a>¶</a></dt><dd><p>A class.</p>
  <dl class="py method"><dt>bar()</dt><dd><p>A method.</p><pre>x = 1

y = 2</pre></dd></dl></dd></dl>
<h3>Notes</h3><ul><li>one</li><li>two</li></ul>
</body></html>"""


def test_html_sections_read_headings_definition_lists_and_pre_blocks():
    units = R.html_sections(HTML)
    paths = [u.path for u in units]
    assert paths == [("zip docs", "Built-in functions"), ("zip docs", "Built-in functions", "class Foo"),
                     ("zip docs", "Built-in functions", "class Foo", "bar()"),
                     ("zip docs", "Built-in functions", "Notes")]
    assert units[0].text == "Some intro text." and "skip me" not in units[0].text
    assert units[2].kind == "entry" and "```\nx = 1\n\ny = 2\n```" in units[2].text
    assert "var x" not in " ".join(u.text for u in units)
    assert units[3].text.split() == ["one", "two"]
    with pytest.raises(TypeError, match="str"):
        R.html_sections(3)


class WordTokenizer:
    """A stand-in for a WordPiece tokenizer: one token per word plus [CLS] and [SEP]."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[0] * (len(t.split()) + 2 * add_special_tokens) for t in texts]}


def test_chunk_sections_split_at_headings_never_merge_across_them_and_set_headers():
    doc = {"doc_id": "open.md", "title": "open", "text": MARKDOWN}
    chunks = R.chunk_sections([doc], max_words=200)
    assert [c.title for c in chunks] == ["open(2)", "open(2) > SYNOPSIS", "open(2) > DESCRIPTION",
                                         "open(2) > DESCRIPTION > Flags", "open(2) > ERRORS"]
    flags = chunks[3]
    assert flags.text.startswith("O_APPEND\nThe file") and "O_CLOEXEC\nEnable" in flags.text
    assert all(c.doc_id == "open.md" for c in chunks) and chunks[0].chunk_id == "open.md#0.0"
    separate = R.chunk_sections([doc], max_words=200, merge_entries=False)
    assert separate[3].title == "open(2) > DESCRIPTION > Flags > O_APPEND"
    assert [c.title for c in R.chunk_sections([doc], headers="page")] == ["open(2)"] * 5
    assert {c.title for c in R.chunk_sections([doc], headers="none")} == {""}
    small = R.chunk_sections([doc], max_words=5)
    assert max(R.count_words(c.text) for c in small if "```" not in c.text) <= 5
    html = R.chunk_sections([{"doc_id": "page.html", "text": HTML}])
    assert html[0].title == "zip docs > Built-in functions"
    assert R.chunk_sections([{"doc_id": "x", "text": HTML}], format="html")[0].title == html[0].title


def test_chunk_sections_with_a_tokenizer_never_leaves_a_chunk_the_embedder_truncates():
    long_text = "# T\n\n## S\n\n" + " ".join(f"w{i}." for i in range(300)) + "\n\n```\n" + \
        "\n".join(f"line {i} of code" for i in range(60)) + "\n```\n"
    doc = {"doc_id": "d.md", "text": long_text}
    tok = WordTokenizer()
    loose = R.chunk_sections([doc], max_words=400)
    assert R.overlong_chunks(loose, tok, max_tokens=50)
    fitted = R.chunk_sections([doc], max_words=400, max_tokens=50, tokenizer=tok)
    assert not R.overlong_chunks(fitted, tok, max_tokens=50)
    assert " ".join(c.text for c in fitted).count("w299.") == 1
    assert R.overlong_chunks([], tok) == []
    with pytest.raises(ValueError, match="together"):
        R.chunk_sections([doc], max_tokens=50)
    with pytest.raises(ValueError, match="headers"):
        R.chunk_sections([doc], headers="yes")
    with pytest.raises(ValueError, match="format"):
        R.chunk_sections([doc], format="pdf")
    with pytest.raises(ValueError, match="heading path alone"):
        R.chunk_sections([{"doc_id": "d", "text": "# " + "long " * 60 + "\n\nword"}],
                         max_tokens=10, tokenizer=tok)


def test_dense_index_warns_or_raises_on_chunks_longer_than_the_embedder_reads():
    long = [Chunk("a#0", "a", "word " * 300), Chunk("b#0", "b", "short")]
    embed = bag_embedder()

    class Model:  # never called: embeddings come from the fake embed_texts below
        pass

    import utils.embed as E
    original = E.embed_texts
    try:
        E.embed_texts = lambda texts, **kw: embed(texts)
        with pytest.warns(UserWarning, match="1 of 2 chunks are longer than max_length=256"):
            index = DenseIndex(long, model=Model(), tokenizer=WordTokenizer(), embed_query=embed)
        assert index.n_overlong == 1
        with pytest.raises(ValueError, match="longer than"):
            DenseIndex(long, model=Model(), tokenizer=WordTokenizer(), on_overlong="error")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DenseIndex(long, model=Model(), tokenizer=WordTokenizer(), on_overlong="ignore")
    finally:
        E.embed_texts = original
    with pytest.raises(ValueError, match="on_overlong"):
        DenseIndex(long, on_overlong="maybe")


# ---------------------------------------------------------------------------------------- fusion

def test_weighted_fuse_min_max_normalises_each_list_and_weights_them():
    a, b, c = (Chunk(f"{x}#0", x, x) for x in "abc")
    lexical = [Hit(a, 10.0, 1), Hit(b, 5.0, 2), Hit(c, 0.0, 3)]
    semantic = [Hit(c, 0.9, 1), Hit(b, 0.8, 2)]
    fused = R.weighted_fuse([lexical, semantic], weights=(0.5, 0.5))
    assert [h.chunk.chunk_id for h in fused] == ["a#0", "c#0", "b#0"]  # a, c tie: first seen first
    assert fused[0].score == pytest.approx(0.5 * 1.0) and fused[1].score == pytest.approx(0.5 * 1.0)
    assert fused[2].score == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)
    assert R.weighted_fuse([[Hit(a, 3.0, 1), Hit(b, 3.0, 2)]])[1].score == 1.0  # flat list -> 1
    assert R.weighted_fuse([[], semantic], k=1)[0].chunk.chunk_id == "c#0"
    weighted = rrf_fuse([lexical, semantic], k_rrf=0, weights=(1.0, 3.0))
    assert weighted[0].chunk.chunk_id == "c#0" and weighted[0].score == pytest.approx(1 / 3 + 3 / 1)
    with pytest.raises(ValueError, match="one weight per retriever"):
        R.weighted_fuse([lexical], weights=(1, 2))
    with pytest.raises(ValueError, match="not all 0"):
        R.weighted_fuse([lexical], weights=(0,))


def test_hybrid_index_weighted_method_and_recommended_index():
    chunks = chunks_of()
    bm25, dn = BM25Index(chunks), dense(chunks)
    hybrid = HybridIndex([bm25, dn], depth=4, method="weighted", weights=(0.3, 0.7))
    query = "Why are strings immutable?"
    want = R.weighted_fuse([bm25.search(query, k=4), dn.search(query, k=4)], (0.3, 0.7), 2)
    assert [h.chunk.chunk_id for h in hybrid.search(query, k=2)] == [h.chunk.chunk_id for h in want]
    with pytest.raises(ValueError, match="method"):
        HybridIndex([bm25], method="sum")
    embed = bag_embedder()
    default = R.recommended_index(chunks, embed([embedding_text(c) for c in chunks]), embed_query=embed)
    assert default.method == R.DEFAULT_FUSION["method"] and len(default.indexes) == 2
    assert default.search(query, k=1)[0].chunk.doc_id == "strings"


# ---------------------------------------------------------------------- passage-level evaluation

def test_evaluate_retrieval_scores_passages_when_questions_name_them_and_says_so():
    chunks = [Chunk("p#0", "p", "Intro about the page and nothing else at all here."),
              Chunk("p#1", "p", "The open call opens the file named by pathname and returns a descriptor."),
              Chunk("q#0", "q", "Other page: the close call closes a file descriptor.")]
    index = BM25Index(chunks)
    span = "The open call opens the file named by pathname and returns a descriptor."
    by_span = [{"question": "page intro pathname", "doc_id": "p", "gold_span": span}]
    passage = evaluate_retrieval(index, by_span, ks=(1, 2))
    document = evaluate_retrieval(index, by_span, ks=(1, 2), level="document")
    assert passage.level == "passage" and document.level == "document"
    assert passage["recall@1"] == 0.0 and passage["recall@2"] == 1.0 and document["recall@1"] == 1.0
    assert passage.per_question["MRR"] == [0.5] and passage.n == 1
    assert "passage level, n = 1" in repr(passage)
    by_id = evaluate_retrieval(index, [{"question": "open file pathname", "passage_ids": ["p#1"]}])
    assert by_id.level == "passage" and by_id["recall@1"] == 1.0
    assert R.first_relevant_ranks(index, by_span, depth=1) == [None]
    assert R.is_relevant(chunks[1], by_span[0]) and not R.is_relevant(chunks[0], by_span[0])
    assert R.is_relevant(chunks[0], by_span[0], level="document")
    assert R.is_relevant(chunks[1], {"question": "x", "passage_ids": "p#1"})
    short = {"question": "x", "gold_span": "open call"}  # shorter than SPAN_MATCH_TOKENS: whole span
    assert R.is_relevant(chunks[1], short) and not R.is_relevant(chunks[2], short)
    with pytest.raises(ValueError, match="needs 'passage_ids' or 'gold_span'"):
        evaluate_retrieval(index, [{"question": "x", "doc_id": "p"}], level="passage")
    with pytest.raises(ValueError, match="level must be"):
        evaluate_retrieval(index, by_span, level="chunk")
    with pytest.raises(ValueError, match="for level='document'"):
        evaluate_retrieval(index, [{"question": "x", "gold_span": span}], level="document")
    with pytest.raises(ValueError, match="no word tokens"):
        R.is_relevant(chunks[0], {"question": "x", "gold_span": "..."})
    with pytest.raises(ValueError, match="no questions"):
        R.first_relevant_ranks(index, [])
    with pytest.raises(TypeError, match="search"):
        R.first_relevant_ranks(object(), by_span)


def test_prompts_around_retrieval():
    chunk = Chunk("a#0", "a", "word " * 100, title="open(2) > DESCRIPTION")
    prompt = R.doc2query_prompt(chunk, max_words=10)
    assert prompt.startswith("open(2) > DESCRIPTION\n" + "word " * 9 + "word\n\n")
    assert "question" in prompt and "manual page" in R.hyde_prompt("q", "a manual page")
    assert R.multiquery_prompt("close a file").endswith("close a file")
    assert set(R.QUERY_PREFIXES) == {"doc2query", "hyde", "multiquery"}
    for bad in (lambda: R.hyde_prompt(" "), lambda: R.multiquery_prompt("")):
        with pytest.raises(ValueError, match="non-empty"):
            bad()
