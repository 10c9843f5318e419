"""A small knowledge graph from the Python documentation: rule-based triple extraction and graph walks.

GraphRAG-style systems ask a language model to extract (subject, relation, object) triples from every
chunk. On a CPU that is out of reach for thousands of chunks, so this module uses *rules* that fit the
way the Python reference is written:

- every API section has an anchor that is its qualified name (``library/json#json.loads``) and a
  signature (``exception json.JSONDecodeError(msg, doc, pos)``), which gives the entity, its kind
  (exception, class, function/method, attribute) and a ``member_of`` edge to its module or class;
- sentences with *raise* (``raises``, ``is raised``, ``will be raised``, ``raising``) that name an
  exception give ``raises`` edges;
- ``subclass of X``, ``derived from X``, ``inherits from X`` give ``subclass_of`` edges;
- ``is an alias for X`` / ``alias of X`` gives ``alias_of`` edges;
- the drawn tree of built-in exceptions (``library/exceptions#exception-hierarchy``) gives the
  ``subclass_of`` edges of the built-in exceptions.

Every edge keeps the ``doc_id`` it came from, so an answer found by walking the graph can cite the
sections that justify each hop. The rules miss anything phrased differently and sometimes attach a
sentence to the wrong entity; :func:`extract_triples` is a baseline, not an information extractor.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import networkx as nx

from utils.rag import split_sentences

__all__ = [
    "RELATIONS",
    "Triple",
    "build_graph",
    "entity_kinds",
    "extract_triples",
    "neighbours",
    "parse_exception_tree",
    "path_sources",
    "walk",
]

#: The relations :func:`extract_triples` produces.
RELATIONS = ("member_of", "raises", "subclass_of", "alias_of")

_EXC_NAME = r"(?:[a-z_][a-z0-9_]*\.)*(?:[A-Z]\w*)?(?:Error|Exception|Warning|Exit|Interrupt|Iteration)"
_EXC_RE = re.compile(rf"\b({_EXC_NAME})\b")
_RAISE_RE = re.compile(r"\b(?:raises?|raised|raising)\b", re.IGNORECASE)
_SUBCLASS_RE = re.compile(
    r"\b(?:subclass(?:es)? of|derived from|inherits from)\s+(?:the\s+)?(?:built-in\s+)?"
    r"(?:exception\s+|class\s+)?([A-Za-z_][\w.]*[A-Za-z0-9_])", re.IGNORECASE)
_ALIAS_RE = re.compile(r"\b(?:an?\s+)?alias (?:for|of)\s+(?:the\s+)?([A-Za-z_][\w.]*[A-Za-z0-9_])",
                       re.IGNORECASE)
_IDENT_RE = re.compile(r"^[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*$")
_TREE_LINE = re.compile(r"^([\s│├└─]*)([A-Z]\w*)")


@dataclass(frozen=True)
class Triple:
    """One extracted fact: ``subject --relation--> obj``, found in section ``source`` (a doc_id)."""

    subject: str
    relation: str
    obj: str
    source: str


def _entity(record: dict) -> tuple[str, str] | None:
    """(qualified name, kind) of an API section, or None for prose sections."""
    doc_id = record.get("doc_id", "")
    if "#" not in doc_id or not doc_id.startswith("library/"):
        return None
    anchor = doc_id.split("#", 1)[1]
    if not _IDENT_RE.match(anchor) or anchor.startswith("module-"):
        return None
    section = record.get("section", "").strip()
    first = section.split(" ", 1)[0]
    if first in ("exception", "class"):
        kind = first
    elif "(" in section:
        kind = "function"
    else:
        kind = "attribute"
    if anchor.endswith(("Error", "Exception", "Warning")) and kind != "function":
        kind = "exception"
    return anchor, kind


def parse_exception_tree(text: str) -> list[tuple[str, str]]:
    """(child, parent) pairs from a drawn class tree such as the built-in exception hierarchy::

        BaseException
         ├── SystemExit
         └── Exception
              └── ValueError
    """
    pairs: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        match = _TREE_LINE.match(line)
        if not match:
            continue
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            pairs.append((name, stack[-1][1]))
        stack.append((depth, name))
    return pairs


class _Resolver:
    """Maps a name as written in a sentence ("JSONDecodeError") to an entity id ("json.JSONDecodeError")."""

    def __init__(self, entities: Iterable[str]):
        self.entities = set(entities)
        self.by_short: dict[str, list[str]] = defaultdict(list)
        for name in sorted(self.entities):
            self.by_short[name.rsplit(".", 1)[-1]].append(name)

    def __call__(self, name: str, context: str) -> str:
        name = name.rstrip(".")
        if name in self.entities:
            return name
        candidates = self.by_short.get(name.rsplit(".", 1)[-1], [])
        module = context.split(".", 1)[0]
        same_module = [c for c in candidates if c.split(".", 1)[0] == module and "." in c]
        if same_module:
            return min(same_module, key=len)
        if len(candidates) == 1:
            return candidates[0]
        return name


def extract_triples(records: Iterable[dict]) -> list[Triple]:
    """Rule-based (subject, relation, object) triples from documentation sections.

    ``records`` are dicts with ``doc_id``, ``section`` and ``text`` (as from
    :func:`utils.embed.docs_corpus`). Returns de-duplicated :class:`Triple` objects in the order found;
    see the module docstring for the rules. Objects that cannot be matched to a documented entity are
    kept as written (e.g. an exception of a third-party package).
    """
    records = list(records)
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not {"doc_id", "text"} <= record.keys():
            raise ValueError(f"record {i} must be a dict with at least 'doc_id' and 'text' keys "
                             "(use utils.embed.docs_corpus())")
    entities = {}
    for record in records:
        found = _entity(record)
        if found:
            entities.setdefault(found[0], found[1])
    resolve = _Resolver(entities)
    triples: list[Triple] = []
    seen: set[tuple[str, str, str]] = set()

    def add(subject: str, relation: str, obj: str, source: str) -> None:
        if subject != obj and (subject, relation, obj) not in seen:
            seen.add((subject, relation, obj))
            triples.append(Triple(subject, relation, obj, source))

    for record in records:
        doc_id = record["doc_id"]
        if doc_id.endswith("#exception-hierarchy"):
            for child, parent in parse_exception_tree(record["text"]):
                add(child, "subclass_of", parent, doc_id)
            continue
        found = _entity(record)
        if not found:
            continue
        subject, kind = found
        if "." in subject:
            add(subject, "member_of", subject.rsplit(".", 1)[0], doc_id)
        for sentence in split_sentences(record["text"], by_line=True):
            if kind in ("exception", "class"):
                for match in _SUBCLASS_RE.finditer(sentence):
                    add(subject, "subclass_of", resolve(match.group(1), subject), doc_id)
            for match in _ALIAS_RE.finditer(sentence):
                add(subject, "alias_of", resolve(match.group(1), subject), doc_id)
            if _RAISE_RE.search(sentence) and not sentence.lower().startswith("raised"):
                if kind == "exception" and _SUBCLASS_RE.search(sentence):
                    continue  # "a subclass of X, raised when ..." describes the exception itself
                for match in _EXC_RE.finditer(sentence):
                    add(subject, "raises", resolve(match.group(1), subject), doc_id)
    return triples


def build_graph(triples: Iterable[Triple], kinds: dict[str, str] | None = None) -> nx.MultiDiGraph:
    """A directed multigraph with one edge per triple (edge attributes ``relation`` and ``source``).

    ``kinds`` optionally maps entity names to a node attribute ``kind``.
    """
    graph = nx.MultiDiGraph()
    for t in triples:
        if not isinstance(t, Triple):
            raise TypeError(f"build_graph takes Triple objects, got {type(t).__name__}")
        graph.add_edge(t.subject, t.obj, key=t.relation, relation=t.relation, source=t.source)
    for name, kind in (kinds or {}).items():
        if name in graph:
            graph.nodes[name]["kind"] = kind
    return graph


def entity_kinds(records: Iterable[dict]) -> dict[str, str]:
    """Entity name -> kind ("exception", "class", "function", "attribute") for the API sections."""
    out: dict[str, str] = {}
    for record in records:
        found = _entity(record)
        if found:
            out.setdefault(*found)
    return out


def neighbours(graph: nx.MultiDiGraph, node: str, relation: str) -> list[tuple[str, str]]:
    """(object, source doc_id) for every ``node --relation--> object`` edge, sorted by object."""
    if node not in graph:
        return []
    return sorted((obj, data["source"]) for _, obj, data in graph.out_edges(node, data=True)
                  if data["relation"] == relation)


def walk(graph: nx.MultiDiGraph, start: str, relations: Sequence[str]) -> list[list[Triple]]:
    """All paths from ``start`` that follow ``relations`` in order, as lists of :class:`Triple`.

    ``walk(g, "json.loads", ["raises", "subclass_of"])`` answers "what does json.loads raise, and what
    is that exception's base class?" -- one path per (exception, base) pair, with the sections
    (``Triple.source``) that justify each hop. An unknown ``start`` gives no paths.
    """
    if isinstance(relations, str) or not relations:
        raise ValueError("relations must be a non-empty list of relation names, e.g. ['raises', "
                         "'subclass_of']")
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown:
        raise ValueError(f"unknown relation(s) {unknown}; choose from {RELATIONS}")
    paths: list[list[Triple]] = [[]]
    for relation in relations:
        extended = []
        for path in paths:
            here = path[-1].obj if path else start
            for obj, source in neighbours(graph, here, relation):
                extended.append([*path, Triple(here, relation, obj, source)])
        paths = extended
    return paths


def path_sources(path: Sequence[Triple]) -> list[str]:
    """The doc_ids a path's hops came from, in hop order, without repeats."""
    return list(dict.fromkeys(t.source for t in path))
