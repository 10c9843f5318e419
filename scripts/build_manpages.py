"""Build ``data/manpages.jsonl.gz``: Part 5's second retrieval evaluation set, from Linux man pages.

Chapter 5-05 ("retrieval that transfers") measures the retrieval toolkit on a corpus it was never
tuned on. This script builds that corpus and its questions, before any tuning, from a pinned Debian
package, and records them in ``data/MANIFEST.json`` and ``data/README.md``:

1. ``apt-get download manpages-dev=6.03-2`` and ``dpkg -x`` it; read the section 2 (system calls)
   and 3 (library functions) pages, skipping the symbolic links (aliases of another page).
2. Convert each page's roff source to Markdown with the small converter below: ``# name(section)``,
   one ``##`` heading per ``.SH`` section, ``###`` per ``.SS``, ``.TP``/``.IP`` items as definition
   list entries (``term`` then ``: definition``), ``.nf``/``.EX`` blocks as fenced code.
3. The **question** is the page's one-line NAME description ("open and possibly create a file"),
   with the page's names masked as ``___`` where they appear as identifiers; the **corpus document**
   is the page *without* its NAME section (so the question's words are not copied into it); the
   **gold passage** (``gold_span``) is the first paragraph of DESCRIPTION (two if the first has
   fewer than 12 words).
   Only the sections in ``KEEP_SECTIONS`` are kept (SYNOPSIS, DESCRIPTION, RETURN VALUE, ERRORS).
4. Keep pages of at most ``MAX_WORDS`` words with a DESCRIPTION and a question of at least three
   words whose description is unique;
   draw ``N_PAGES`` of them with a seeded shuffle and split the questions into dev (``N_DEV``) and
   test (the rest), also seeded. Record for each question the share of its content words that occur
   in its gold passage and in its whole page (the overlap the README reports).

Run: ``python scripts/build_manpages.py`` (needs ``apt-get`` and ``dpkg``, i.e. Debian or Ubuntu).
The output is byte-for-byte reproducible from the pinned package.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "data"
PACKAGE, VERSION = "manpages-dev", "6.03-2"
OUT = "manpages.jsonl.gz"
N_PAGES, N_DEV, SEED = 120, 40, 0
#: The sections kept: the reference core of a page (what it does, how it is called, what it returns,
#: how it fails). EXAMPLES, NOTES, BUGS, SEE ALSO, STANDARDS, ATTRIBUTES ... are left out, and so
#: are pages longer than MAX_WORDS after that, to keep embedding the corpus affordable on one CPU
#: thread (the chapter embeds it four times).
KEEP_SECTIONS = ("SYNOPSIS", "DESCRIPTION", "RETURN VALUE", "ERRORS")
MAX_WORDS = 600
STOPWORDS = frozenset("""
a an the and or but if then else of to in on at by for with from as into onto about than that this
these those it its is are was were be been being do does did done have has had not no nor so such
can could may might must shall should will would all any some each every more most other same own
""".split())

# ------------------------------------------------------------------------------------ roff -> text

_SPECIAL = {
    "aq": "'", "dq": '"', "lq": '"', "rq": '"', "oq": "'", "cq": "'", "em": "—", "en": "–",
    "rs": "\\", "ti": "~", "ha": "^", "bu": "•", "co": "©", "mu": "×", "di": "÷", "+-": "±",
    "<=": "<=", ">=": ">=", "!=": "!=", "->": "->", "<-": "<-", "hy": "-", "dg": "†", "at": "@",
    "sh": "#", "Do": "$", "ba": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "sl": "/",
    "ga": "`", "aa": "´", "pc": "·", "fm": "′", "a^": "^", "ss": "ß", "de": "°", "tm": "™",
    "ua": "↑", "da": "↓", "rg": "®", "sc": "§", "ps": "¶", "Po": "£", "Eu": "€",
}


def unescape(line: str) -> str:
    """Roff escapes to plain text; font changes are dropped."""
    line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)
    line = re.sub(r"\\\*(\[[^\]]*\]|\(..|.)", lambda m: {"(lq": '"', "(rq": '"', "R": "®",
                                                          "(Tm": "™"}.get(m.group(1), ""), line)
    line = re.sub(r"\\\[([^\]]+)\]", lambda m: _SPECIAL.get(m.group(1), ""), line)
    line = re.sub(r"\\\((..)", lambda m: _SPECIAL.get(m.group(1), ""), line)
    line = re.sub(r"\\[sS][-+]?\d+", "", line)
    line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\~", " ").replace("\\ ", " ")
    line = re.sub(r"\\[&|^:%c)]", "", line)
    line = line.replace("\\(", "(").replace("\\.", ".").replace("\\'", "'").replace("\\`", "`")
    return line


def macro_args(rest: str) -> list[str]:
    """Arguments of a macro line: space-separated, double quotes group ("" is a literal quote)."""
    args, current, quoted, i = [], "", False, 0
    while i < len(rest):
        ch = rest[i]
        if ch == '"':
            if quoted and rest[i + 1:i + 2] == '"':
                current += '"'
                i += 1
            else:
                quoted = not quoted
        elif ch in " \t" and not quoted:
            if current:
                args.append(current)
            current = ""
        else:
            current += ch
        i += 1
    if current:
        args.append(current)
    return args


FONT_MACROS = {"B", "I", "R", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI"}
IGNORED = {"RS", "RE", "in", "sp", "br", "ad", "na", "nh", "hy", "ft", "ne", "ti", "ll", "ps",
           "vs", "ta", "ce", "ul", "LP_", "UE", "ME", "YS", "ns", "rs", "ds", "nr", "ie", "el",
           "if", "de", "ig", "so", "bp", "tr", "cu", "nop", "PD", "HP", "\\}", "ss", "mso", "TH"}


def roff_to_blocks(source: str) -> list[tuple[str, str]]:
    """The page as a flat list of (kind, text); kind: ``h2``, ``h3``, ``p``, ``term``, ``code``."""
    source = re.sub(r"\\\n", "", source)  # line continuations
    blocks: list[tuple[str, str]] = []
    para: list[str] = []
    code: list[str] | None = None
    pending_term = False
    in_table = table_format = False

    def flush() -> None:
        nonlocal para
        text = " ".join(" ".join(para).split())
        if text:
            blocks.append(("p", text))
        para = []

    for raw in source.split("\n"):
        if raw.startswith(('.\\"', "'\\\"", "\\\"")) or raw.strip() in (".", "'"):
            continue
        if in_table:
            if raw.startswith(".TE"):
                in_table = False
                blocks.append(("code", "\n".join(code or [])))
                code = None
            elif table_format:
                if raw.rstrip().endswith("."):
                    table_format = False
            elif not raw.startswith("."):
                code.append(unescape(raw).replace("\t", "  ").replace("T{", "").replace("T}", ""))
            continue
        if raw.startswith((".", "'")):
            name, _, rest = raw[1:].partition(" ")
            name = name.strip()
            args = [unescape(a) for a in macro_args(rest)]
            if name in ("SH", "SS"):
                flush()
                pending_term = False
                blocks.append(("h2" if name == "SH" else "h3", " ".join(args)))
            elif name in ("PP", "P", "LP"):
                flush()
                pending_term = False
            elif name == "TP":
                flush()
                pending_term = True
            elif name == "IP":
                flush()
                if args and args[0].strip() not in ("", "*", "•", "\\(bu"):
                    blocks.append(("term", args[0]))
                    pending_term = False
            elif name in ("nf", "EX"):
                flush()
                code = []
            elif name in ("fi", "EE"):
                if code is not None:
                    blocks.append(("code", "\n".join(code).strip("\n")))
                code = None
            elif name == "TS":
                flush()
                in_table, table_format, code = True, True, []
            elif name in FONT_MACROS:
                alternate = name in {"BR", "BI", "IB", "IR", "RB", "RI"}
                text = "".join(args) if alternate else " ".join(args)
                if code is not None:
                    code.append(text)
                elif pending_term:
                    blocks.append(("term", text))
                    pending_term = False
                else:
                    para.append(text)
            elif name in ("UR", "MT"):
                para.append(" ".join(args))
            continue
        text = unescape(raw)
        if code is not None:
            code.append(text)
        elif pending_term:
            blocks.append(("term", text.strip()))
            pending_term = False
        else:
            para.append(text)
    flush()
    if code:
        blocks.append(("code", "\n".join(code)))
    return [(k, t) for k, t in blocks if t.strip()]


def page_markdown(title: str, blocks: list[tuple[str, str]]) -> str:
    """The page as Markdown: headings, paragraphs, definition-list entries, fenced code."""
    out = [f"# {title}"]
    i = 0
    while i < len(blocks):
        kind, text = blocks[i]
        if kind == "h2":
            out.append(f"## {text}")
        elif kind == "h3":
            out.append(f"### {text}")
        elif kind == "code":
            out.append(f"```\n{text}\n```")
        elif kind == "term":
            body = []
            while i + 1 < len(blocks) and blocks[i + 1][0] == "p":
                i += 1
                body.append(blocks[i][1])
            if body:
                out.append(f"{text}\n: " + "\n\n  ".join(body))
            else:
                out.append(text)
        else:
            out.append(text)
        i += 1
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ the records

def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def content(text: str) -> set[str]:
    return {w for w in words(text) if w not in STOPWORDS}


def mask(description: str, names: list[str]) -> tuple[str, int]:
    """Replace the page's names where they appear as identifiers: ``name()``, or a name that is not
    a plain lower-case English-looking word (has ``_``, a digit or a capital)."""
    count = 0
    for name in sorted(names, key=len, reverse=True):
        looks_like_code = bool(re.search(r"[_\dA-Z]", name))
        word = re.escape(name)
        pattern = rf"\b{word}\b(\(\))?" if looks_like_code else rf"\b{word}\(\)"
        description, n = re.subn(pattern, "___", description)
        count += n
    return description, count


def page_record(path: Path) -> dict | None:
    source = gzip.decompress(path.read_bytes()).decode("utf-8")
    spdx = re.search(r"SPDX-License-Identifier:\s*(\S+)", source)
    th = re.search(r"^\.TH\s+(\S+)\s+(\S+)", source, re.M)
    if not th:
        return None
    blocks = roff_to_blocks(source)
    heads = [i for i, (k, _) in enumerate(blocks) if k == "h2"]
    if not heads or blocks[heads[0]][1].upper() != "NAME":
        return None
    name_end = heads[1] if len(heads) > 1 else len(blocks)
    name_line = " ".join(t for _, t in blocks[heads[0] + 1:name_end])
    if " - " not in name_line:
        return None
    names_part, description = name_line.split(" - ", 1)
    names = [n.strip() for n in names_part.split(",") if n.strip()]
    kept, keep = [], False
    for kind, text in blocks[name_end:]:
        if kind == "h2":
            keep = text in KEEP_SECTIONS
        if keep:
            kept.append((kind, text))
    sections = [t for k, t in kept if k == "h2"]
    if "DESCRIPTION" not in sections:
        return None
    d = next(i for i, (k, t) in enumerate(kept) if k == "h2" and t == "DESCRIPTION")
    paragraphs = []
    for kind, text in kept[d + 1:]:
        if kind in ("h2", "h3"):
            break
        if kind == "p":
            paragraphs.append(text)
            if sum(len(p.split()) for p in paragraphs) >= 12:
                break
    if not paragraphs:
        return None
    question, n_masked = mask(description.strip(), names)
    title = f"{th.group(1)}({th.group(2)})"
    text = page_markdown(title, kept)
    if len(text.split()) > MAX_WORDS:
        return None
    gold = "\n\n".join(paragraphs)
    assert all(p in text for p in paragraphs), title
    q = content(question)
    return {
        "doc_id": f"man{th.group(2)[0]}/{path.name.removesuffix('.gz')}",
        "title": title,
        "names": names,
        "question": question,
        "n_masked": n_masked,
        "gold_span": gold,
        "text": text,
        "licence": spdx.group(1) if spdx else "GPL-2+ (Debian copyright file)",
        "overlap_gold": round(len(q & content(gold)) / len(q), 4) if q else 0.0,
        "overlap_page": round(len(q & content(text)) / len(q), 4) if q else 0.0,
    }


def build(root: Path) -> list[dict]:
    pages = []
    for section in ("man2", "man3"):
        for path in sorted((root / "usr/share/man" / section).iterdir()):
            if path.is_symlink() or not path.name.endswith(".gz"):
                continue
            record = page_record(path)
            if record and len(words(record["question"])) >= 3:
                pages.append(record)
    seen: dict[str, int] = {}
    for r in pages:
        seen[r["question"].lower()] = seen.get(r["question"].lower(), 0) + 1
    pages = [r for r in pages if seen[r["question"].lower()] == 1]
    chosen = random.Random(SEED).sample(pages, N_PAGES)
    dev = set(random.Random(SEED + 1).sample(range(N_PAGES), N_DEV))
    for i, r in enumerate(chosen):
        r["split"] = "dev" if i in dev else "test"
    return sorted(chosen, key=lambda r: r["doc_id"]), len(pages)


README_SECTION = """\
## manpages.jsonl.gz — Linux man pages as a second retrieval evaluation set

{n} pages of sections 2 (system calls) and 3 (library functions) of the Linux
man-pages project, one JSON record per page, built by
`python scripts/build_manpages.py` before anything was tuned on it (chapter
5-05 uses it to check the retrieval toolkit on a corpus it was never tuned on).

Fields: `doc_id` (`man2/open.2`), `title` (`open(2)`), `names` (the names the
NAME section lists), `question` (the NAME line's one-line description with
the names masked as `___` where they appear as identifiers), `n_masked`,
`gold_span` (the first paragraph of DESCRIPTION, two if the first has fewer
than 12 words: the passage that says what the page documents), `text` (the
page as Markdown **without its NAME section**, keeping only SYNOPSIS,
DESCRIPTION, RETURN VALUE and ERRORS: `#` title, `##` sections, `###`
subsections, `.TP` items as definition-list entries `term` / `: definition`,
code in fenced blocks), `licence` (the page's SPDX identifier), `split`
(`dev`: {n_dev} questions for choosing settings; `test`: {n_test}, scored once),
`overlap_gold` and `overlap_page` (share of the question's content words found
in the gold passage / the whole page).

Question-vs-gold overlap: on average {og:.0%} of a question's content words
occur in its gold passage and {op:.0%} anywhere in its page; {zero:.0%} of the
questions share no content word with their gold passage. The pages were drawn
with a seeded shuffle (seed {seed}) from the {pool:,} pages that have a
DESCRIPTION, at most {max_words} words in those four sections (to keep embedding
the corpus affordable on one CPU thread), a question of at least three words
and a unique description; the
dev/test split is a second seeded shuffle.

* Source: Debian package `manpages-dev` {version}, `usr/share/man/man2/*.2.gz`
  and `usr/share/man/man3/*.3.gz` (symbolic links, i.e. alias pages, skipped),
  converted from roff to Markdown by the script's own converter.
* Licence: the Linux man-pages are free documentation under several licences,
  recorded per page in `licence` (most are `Linux-man-pages-copyleft`: verbatim
  copies and modified versions may be distributed provided the copyright notice
  and permission notice are preserved); Debian's copyright file summarises the
  package as GPL-2+. Copyright © the man-pages authors (Michael Kerrisk,
  Alejandro Colomar and many others); the converted text here is a modified
  version (formatting only).
"""


def update_manifest_and_readme(blob: bytes, records: list[dict], pool: int) -> None:
    manifest_path = DATA_DIR / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["files"][OUT] = {
        "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob),
        "records": len(records),
        "source": {"packages": [{"name": PACKAGE, "version": VERSION}],
                   "path": "usr/share/man/man2/*.2.gz, usr/share/man/man3/*.3.gz",
                   "rebuild": "python scripts/build_manpages.py"},
    }
    manifest["files"] = dict(sorted(manifest["files"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    readme_path = DATA_DIR / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    readme = re.sub(r"\n## manpages\.jsonl\.gz.*?(?=\n## |\Z)", "", readme, flags=re.S)
    readme = readme.rstrip("\n") + "\n"
    row = f"| `{OUT}` | {len(records):,} | {len(blob):,} |"
    lines = [ln for ln in readme.split("\n") if not ln.startswith(f"| `{OUT}`")]
    last_row = max(i for i, ln in enumerate(lines) if ln.startswith("| `"))
    lines.insert(last_row + 1, row)
    readme = "\n".join(lines)
    n_dev = sum(r["split"] == "dev" for r in records)
    section = README_SECTION.format(
        n=len(records), n_dev=n_dev, n_test=len(records) - n_dev, seed=SEED, pool=pool,
        version=VERSION, max_words=MAX_WORDS,
        og=sum(r["overlap_gold"] for r in records) / len(records),
        op=sum(r["overlap_page"] for r in records) / len(records),
        zero=sum(r["overlap_gold"] == 0 for r in records) / len(records))
    readme_path.write_text(readme + "\n" + section, encoding="utf-8")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=tmp, check=True,
                       capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(Path(tmp) / "root")], check=True)
        records, pool = build(Path(tmp) / "root")
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    blob = gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)
    (DATA_DIR / OUT).write_bytes(blob)
    update_manifest_and_readme(blob, records, pool)
    print(f"wrote data/{OUT}: {len(records)} pages of {pool} eligible, {len(blob):,} bytes",
          file=sys.stderr)


if __name__ == "__main__":
    main()
