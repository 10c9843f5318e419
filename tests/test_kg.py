"""Tests for utils.kg on hand-made documentation records (no corpus, no model)."""
import networkx as nx
import pytest

from utils import kg
from utils.rag import split_sentences

TREE = """The class hierarchy for built-in exceptions is:

BaseException
 ├── SystemExit
 └── Exception
      ├── ArithmeticError
      │    └── ZeroDivisionError
      └── ValueError
           └── UnicodeError
"""

RECORDS = [
    {"doc_id": "library/exceptions#exception-hierarchy", "section": "Exception hierarchy", "text": TREE},
    {"doc_id": "library/exceptions#ValueError", "section": "exception ValueError",
     "text": "Raised when an operation receives an argument of the right type but a bad value."},
    {"doc_id": "library/json#json.loads", "section": "json.loads(s, *, cls=None)",
     "text": "Deserialize s to a Python object.\n\nIf the data is not a valid JSON document, a "
             "JSONDecodeError will be raised. It may also raise a TypeError."},
    {"doc_id": "library/json#json.JSONDecodeError", "section": "exception json.JSONDecodeError(msg, doc, pos)",
     "text": "Subclass of ValueError with the following additional attributes:"},
    {"doc_id": "library/json#json.JSONDecoder", "section": "class json.JSONDecoder(*, strict=True)",
     "text": "Simple JSON decoder."},
    {"doc_id": "library/json#json.JSONDecoder.decode", "section": "decode(s)",
     "text": "Return the Python object. JSONDecodeError will be raised if the document is not valid."},
    {"doc_id": "library/json#json.JSONDecodeError.msg", "section": "msg", "text": "The error message."},
    {"doc_id": "library/foo#foo.FooError", "section": "exception foo.FooError",
     "text": "A subclass of OSError, raised when foo fails with a BarError."},
    {"doc_id": "library/foo#foo.OldWarning", "section": "foo.OldWarning",
     "text": "Deprecated name; it is an alias for foo.FooError."},
    {"doc_id": "library/bar#bar.Error", "section": "exception bar.Error", "text": "Base error."},
    {"doc_id": "library/baz#baz.Error", "section": "exception baz.Error", "text": "Base error."},
    {"doc_id": "library/qux#qux.run", "section": "qux.run()",
     "text": "Raises Error on failure, or a ThirdPartyError from a plugin."},
    {"doc_id": "library/qux#qux.fetch", "section": "qux.fetch()", "text": "Raises FooError when it fails."},
    {"doc_id": "library/json#module-json", "section": "json", "text": "JSON raises nothing here."},
    {"doc_id": "tutorial/errors#handling", "section": "Handling", "text": "A ValueError is raised."},
    {"doc_id": "library/odd#odd.thing", "section": "", "text": "no signature"},
]


@pytest.fixture(scope="module")
def triples():
    return kg.extract_triples(RECORDS)


@pytest.fixture(scope="module")
def graph(triples):
    return kg.build_graph(triples, kg.entity_kinds(RECORDS))


def facts(triples, relation):
    return {(t.subject, t.obj) for t in triples if t.relation == relation}


def test_sentences_split_on_stops_and_newlines():
    assert split_sentences("One. Two!\nThree?  Four", by_line=True) == ["One.", "Two!", "Three?", "Four"]


def test_parse_exception_tree():
    pairs = kg.parse_exception_tree(TREE)
    assert ("SystemExit", "BaseException") in pairs
    assert ("Exception", "BaseException") in pairs
    assert ("ZeroDivisionError", "ArithmeticError") in pairs
    assert ("ValueError", "Exception") in pairs
    assert ("UnicodeError", "ValueError") in pairs
    assert len(pairs) == 6


def test_raises_and_resolution(triples):
    raises = facts(triples, "raises")
    assert ("json.loads", "json.JSONDecodeError") in raises  # short name resolved in the same module
    assert ("json.loads", "TypeError") in raises  # unknown to the records: kept as written
    assert ("json.JSONDecoder.decode", "json.JSONDecodeError") in raises
    assert ("qux.run", "ThirdPartyError") in raises
    assert ("qux.fetch", "foo.FooError") in raises  # the one entity of that name, in another module
    assert ("qux.run", "Error") in raises  # ambiguous (bar.Error, baz.Error): kept as written
    assert not any(s == "ValueError" for s, _ in raises)  # "Raised when ..." describes itself
    assert not any(s == "foo.FooError" for s, _ in raises)  # "a subclass of X, raised when ..."


def test_subclass_alias_member(triples):
    sub = facts(triples, "subclass_of")
    assert ("json.JSONDecodeError", "ValueError") in sub
    assert ("foo.FooError", "OSError") in sub
    assert ("ValueError", "Exception") in sub
    assert ("foo.OldWarning", "foo.FooError") in facts(triples, "alias_of")
    member = facts(triples, "member_of")
    assert ("json.JSONDecoder.decode", "json.JSONDecoder") in member
    assert ("json.loads", "json") in member
    assert not any(s.startswith("module-") for s, _ in member)
    sources = {t.source for t in triples}
    assert "tutorial/errors#handling" not in sources  # prose sections give no entity


def test_no_duplicates_and_sources(triples):
    keys = [(t.subject, t.relation, t.obj) for t in triples]
    assert len(keys) == len(set(keys))
    loads = [t for t in triples if t.subject == "json.loads" and t.relation == "raises"]
    assert {t.source for t in loads} == {"library/json#json.loads"}


def test_entity_kinds():
    kinds = kg.entity_kinds(RECORDS)
    assert kinds["json.JSONDecodeError"] == "exception"
    assert kinds["json.JSONDecoder"] == "class"
    assert kinds["json.loads"] == "function"
    assert kinds["json.JSONDecodeError.msg"] == "attribute"
    assert kinds["foo.OldWarning"] == "exception"
    assert kinds["odd.thing"] == "attribute"
    assert "json" not in kinds and "module-json" not in kinds


def test_extract_validates_records():
    with pytest.raises(ValueError, match="doc_id"):
        kg.extract_triples([{"text": "no id"}])
    with pytest.raises(ValueError, match="record 0"):
        kg.extract_triples(["not a dict"])


def test_build_graph(graph):
    assert isinstance(graph, nx.MultiDiGraph)
    assert graph.nodes["json.loads"]["kind"] == "function"
    data = graph.get_edge_data("json.loads", "json.JSONDecodeError")
    assert data["raises"]["source"] == "library/json#json.loads"
    with pytest.raises(TypeError, match="Triple"):
        kg.build_graph([("a", "raises", "b")])
    assert kg.build_graph([]).number_of_nodes() == 0


def test_neighbours(graph):
    assert kg.neighbours(graph, "json.loads", "raises") == [
        ("TypeError", "library/json#json.loads"), ("json.JSONDecodeError", "library/json#json.loads")]
    assert kg.neighbours(graph, "nowhere", "raises") == []


def test_walk_two_and_three_hops(graph):
    paths = kg.walk(graph, "json.loads", ["raises", "subclass_of"])
    assert [[t.obj for t in p] for p in paths] == [["json.JSONDecodeError", "ValueError"]]
    assert kg.path_sources(paths[0]) == ["library/json#json.loads", "library/json#json.JSONDecodeError"]
    three = kg.walk(graph, "json.loads", ["raises", "subclass_of", "subclass_of"])
    assert [t.obj for t in three[0]] == ["json.JSONDecodeError", "ValueError", "Exception"]
    assert kg.path_sources(three[0])[-1] == "library/exceptions#exception-hierarchy"
    assert kg.walk(graph, "unknown.function", ["raises"]) == []


def test_walk_validates():
    g = nx.MultiDiGraph()
    with pytest.raises(ValueError, match="non-empty"):
        kg.walk(g, "a", [])
    with pytest.raises(ValueError, match="non-empty"):
        kg.walk(g, "a", "raises")
    with pytest.raises(ValueError, match="unknown relation"):
        kg.walk(g, "a", ["calls"])


def test_path_sources_deduplicates():
    t1 = kg.Triple("a", "raises", "b", "s1")
    t2 = kg.Triple("b", "subclass_of", "c", "s1")
    assert kg.path_sources([t1, t2]) == ["s1"]
