"""Rewrite the README's "What each chapter costs" table from measured values.

    python scripts/update_readme_costs.py [_build/executed]

Reads each executed chapter's glued ``chapter_runtime_min``, ``chapter_peak_rss_gib`` and
``chapter_machine`` (written by ``utils.ChapterClock``; see ``make nbval``) and replaces the table
between the ``costs:start`` / ``costs:end`` markers in README.md. The numbers are never typed by hand.
"""
from __future__ import annotations

import ast
import datetime
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- costs:start -->", "<!-- costs:end -->"
RECORD = "application/papermill.record/text/plain"


def glued_values(notebook: nbformat.NotebookNode) -> dict[str, object]:
    values = {}
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            if name and RECORD in output.get("data", {}):
                values[name] = ast.literal_eval(output["data"][RECORD])
    return values


def cost_table(executed: Path) -> str:
    rows, machines, minutes, peaks = [], set(), 0.0, []
    for path in sorted(executed.glob("chapters/**/*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        values = glued_values(notebook)
        title = next(c.source.splitlines()[0].lstrip("# ") for c in notebook.cells if c.cell_type == "markdown")
        rel = path.relative_to(executed).as_posix()
        machines.add(values["chapter_machine"])
        minutes += values["chapter_runtime_min"]
        peaks.append(values["chapter_peak_rss_gib"])
        rows.append(
            f"| {title} (`{rel}`) | {values['chapter_runtime_min']:.1f} min | {values['chapter_peak_rss_gib']:.1f} GiB |"
        )
    if not rows:
        raise SystemExit(f"No executed chapters under {executed}: run `make nbval` first.")
    today = datetime.date.today().isoformat()
    shared = " two at a time (so each shared the machine with another)" if len(rows) > 1 else ""
    header = (
        f"Measured on {'; '.join(sorted(machines))}, {today}, while `make nbval` executed "
        f"the chapters{shared}:\n\n| Chapter | Run time | Peak memory |\n|---|---|---|"
    )
    total = f"| **All {len(rows)} chapters** (sum of run times; largest peak) | {minutes:.1f} min | {max(peaks):.1f} GiB |"
    return "\n".join([header, *rows, total])


def main(executed_dir: str = "_build/executed") -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{cost_table(ROOT / executed_dir)}\n{END}{after}")
    print(f"updated {readme}")
    from binder_fit import main as update_binder_list  # intro.md's Binder list follows the new table

    update_binder_list([])


if __name__ == "__main__":
    main(*sys.argv[1:])
