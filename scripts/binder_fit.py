"""List, on the intro page beside the Binder note, the chapters whose measured peak memory does not
fit in mybinder.org's memory limit.

    python scripts/binder_fit.py           # rewrite intro.md between the binder:start/end markers
    python scripts/binder_fit.py --check   # exit 1 if intro.md's list differs from the README table

Reads the README's cost table (written by scripts/update_readme_costs.py from the last `make nbval`
run; run this script after that one), so the list, its date and its machine are never typed by hand.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README, INTRO = ROOT / "README.md", ROOT / "intro.md"
#: mybinder.org's memory limit per session: 2 GB (its documentation's "about 2 GB" is 2 * 10**9
#: bytes), i.e. 1.86 GiB, for the whole session: the Jupyter server's own share comes out of it too.
BINDER_LIMIT_GIB = 2e9 / 2**30
START, END = "<!-- binder:start -->", "<!-- binder:end -->"
_ROW = re.compile(
    r"^\| (?P<title>.+) \(`(?P<path>chapters/[^`]+)`\) \| [\d.]+ min \| (?P<gib>[\d.]+) GiB \|$")
_MEASURED = re.compile(r"^Measured on (?P<machine>.+?), (?P<date>\d{4}-\d{2}-\d{2}),", re.M)


def readme_costs(text: str) -> tuple[str, str, list[tuple[str, str, float]]]:
    """``(machine, date, [(title, path, peak GiB), ...])`` from the README's generated table."""
    table = text.split("<!-- costs:start -->", 1)[1].split("<!-- costs:end -->", 1)[0]
    measured = _MEASURED.search(table)
    if measured is None:
        raise SystemExit("README.md's cost table has no 'Measured on <machine>, <date>,' line: "
                         "run python scripts/update_readme_costs.py")
    matches = [m for m in map(_ROW.match, table.splitlines()) if m]
    rows = [(m["title"], m["path"], float(m["gib"])) for m in matches]
    return measured["machine"], measured["date"], rows


def binder_note(readme_text: str) -> str:
    """The Markdown between the markers: which chapters exceed Binder's memory, and why."""
    machine, date, rows = readme_costs(readme_text)
    too_big = [(title, path, gib) for title, path, gib in rows if gib > BINDER_LIMIT_GIB]
    head = (f"mybinder.org gives a session about 2 GB of memory ({BINDER_LIMIT_GIB:.2f} GiB). "
            f"Measured on {date} ({machine}), ")
    if not too_big:
        return head + "every chapter's peak memory fits."
    items = "\n".join(f"- [{title}]({path}): {gib:.1f} GiB" for title, path, gib in too_big)
    return (head + f"{len(too_big)} of {len(rows)} chapters peak above that, so Binder is likely "
            "to stop their kernel; run them in Colab or locally instead:\n" + items)


def with_note(intro_text: str, note: str) -> str:
    before, rest = intro_text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{note}\n{END}{after}"


def main(argv: list[str]) -> int:
    intro = INTRO.read_text(encoding="utf-8")
    updated = with_note(intro, binder_note(README.read_text(encoding="utf-8")))
    if "--check" in argv:
        if updated != intro:
            print("intro.md's Binder list differs from README.md's cost table: "
                  "run python scripts/binder_fit.py")
            return 1
        return 0
    INTRO.write_text(updated, encoding="utf-8")
    print(f"updated {INTRO.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
