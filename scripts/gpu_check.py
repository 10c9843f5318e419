"""Execute every chapter on a CUDA GPU with nbval and record, per chapter, pass/fail, run time and
peak GPU memory; then give the intro's cost table its GPU column.

    python scripts/gpu_check.py [CHAPTER ...]     # `make gpu-check`; all chapters by default
    python scripts/gpu_check.py --update-intro    # only rewrite intro.md's GPU column and the cards

Writes ``measurements/gpu-check.json`` and ``measurements/gpu-check.md`` (commit both after a run).
Peak GPU memory is the most memory the chapter's kernel process held on the GPU, sampled every
0.2 s from ``nvidia-smi`` (CUDA context and PyTorch's cached blocks included), so it is what the
reader's GPU must have free. Without that file, intro.md's GPU column says "not yet measured".
Each chapter's resource card has an "On a GPU" line that this script writes from the same file.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "measurements" / "gpu-check.json"
REPORT = RESULTS.with_suffix(".md")
INTRO = ROOT / "intro.md"
NOT_MEASURED = "not yet measured"
_ROW = re.compile(r"^\| \[[^\]]*\]\((chapters/[^)]+\.ipynb)\) \|")


class GpuMemorySampler(threading.Thread):
    """Highest total GPU memory (MiB) held by processes other than those present at the start."""

    def __init__(self, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak_mib, self._stop = interval_s, 0, threading.Event()
        self._ignore = set(self._usage())  # e.g. a notebook server the person left running

    @staticmethod
    def _usage() -> dict[str, int]:
        try:
            query = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
            out = subprocess.run(
                ["nvidia-smi", *query],
                capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:  # no NVIDIA driver tools: the peak reads 0
            return {}
        usage = {}
        for line in out.strip().splitlines():
            pid, _, mib = line.partition(",")
            if mib.strip().isdigit():
                usage[pid.strip()] = int(mib)
        return usage

    def run(self) -> None:
        while not self._stop.is_set():
            used = sum(m for pid, m in self._usage().items() if pid not in self._ignore)
            self.peak_mib = max(self.peak_mib, used)
            self._stop.wait(self.interval_s)

    def stop(self) -> int:
        self._stop.set()
        self.join()
        return self.peak_mib


def gpu_name() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA GPU and torch sees none: run it on a GPU machine.")
    return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def run_chapter(chapter: str, executed_dir: Path) -> dict[str, object]:
    """Execute one chapter under nbval as CI does; pass/fail, minutes and peak GPU GiB."""
    sampler = GpuMemorySampler()
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", chapter, "--nbval-lax", "--nbval-cell-timeout=1200",
         "-p", "no:cacheprovider", "-q", "--save-executed", str(executed_dir)],
        cwd=ROOT, capture_output=True, text=True, check=False)
    minutes = (time.perf_counter() - start) / 60
    peak_gib = sampler.stop() / 1024
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return {"chapter": chapter, "passed": proc.returncode == 0, "runtime_min": round(minutes, 2),
            "peak_gpu_gib": round(peak_gib, 2), "log_tail": "" if proc.returncode == 0 else tail}


def report(results: dict) -> str:
    """The Markdown table of a run."""
    lines = [f"# GPU check: {results['gpu']}, {results['date']}", "",
             f"`make gpu-check` executed each chapter alone under nbval. {results['summary']}", "",
             "| Chapter | Result | Run time | Peak GPU memory |", "|---|---|---|---|"]
    for row in results["chapters"]:
        verdict = "pass" if row["passed"] else "**FAIL**"
        lines.append(f"| `{row['chapter']}` | {verdict} | {row['runtime_min']:.1f} min "
                     f"| {row['peak_gpu_gib']:.1f} GiB |")
    for row in results["chapters"]:
        if not row["passed"]:
            lines += ["", f"## {row['chapter']}", "", "```", row["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def load_results(path: Path = RESULTS) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def gpu_cell(results: dict | None, chapter: str) -> str:
    """One chapter's GPU column: its result, or "not yet measured"."""
    rows = {row["chapter"]: row for row in (results or {}).get("chapters", [])}
    row = rows.get(chapter)
    if row is None:
        return NOT_MEASURED
    if not row["passed"]:
        return "fails (see measurements/gpu-check.md)"
    return f"{row['runtime_min']:.1f} min, {row['peak_gpu_gib']:.1f} GiB"


def intro_with_gpu_column(text: str, results: dict | None) -> str:
    """intro.md's cost table with a last "GPU" column (header names the GPU, or says unmeasured)."""
    label = f"GPU: {results['gpu']}, {results['date']}" if results else "GPU"
    out = []
    for line in text.splitlines():
        cells = line.split(" | ")
        if line.startswith("| Chapter | Hardware | Run time | Peak memory"):
            line = f"| Chapter | Hardware | Run time | Peak memory | {label} |"
        elif line.startswith("|---|---|---|---"):
            line = "|---|---|---|---|---|"
        elif (match := _ROW.match(line)) and len(cells) >= 4:
            line = " | ".join(cells[:4]).rstrip(" |") + f" | {gpu_cell(results, match.group(1))} |"
        out.append(line)
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


CARD_GPU_LINE = re.compile(r"^- \*\*On a GPU:\*\*.*$", re.MULTILINE)
_CARD_ANCHOR = re.compile(r"\{glue:text\}`chapter_machine(?::s)?`\.")


def card_gpu_line(results: dict | None, chapter: str) -> str:
    """The resource card's "On a GPU" line of one chapter, from a ``make gpu-check`` run."""
    rows = {row["chapter"]: row for row in (results or {}).get("chapters", [])}
    row = rows.get(chapter)
    if row is None:
        return ("- **On a GPU:** not yet measured; `make gpu-check` runs every chapter on CUDA "
                "and writes this line.")
    where = f"{results['gpu']}, {results['date']}"
    if not row["passed"]:
        return f"- **On a GPU:** fails on {where}; see `measurements/gpu-check.md`."
    return (f"- **On a GPU:** passes in {row['runtime_min']:.1f} minutes with "
            f"{row['peak_gpu_gib']:.1f} GiB peak GPU memory on {where} (`make gpu-check`).")


def card_with_gpu_line(card: str, line: str) -> str:
    """``card`` (a resource card's Markdown) with its "On a GPU" line set to ``line``."""
    if CARD_GPU_LINE.search(card):
        return CARD_GPU_LINE.sub(lambda _: line, card, count=1)
    anchor = _CARD_ANCHOR.search(card)
    if anchor is None:
        raise ValueError("resource card without its measured-cost bullet (ending "
                         "{glue:text}`chapter_machine`.): add that bullet, then rerun")
    # the bullet may run on after the glued machine name: the new line goes before the next bullet
    cut = card.find("\n- ", anchor.end())
    cut = card.find("\n:::", anchor.end()) if cut < 0 else cut
    cut = len(card) if cut < 0 else cut
    return f"{card[:cut]}\n{line}{card[cut:]}"


def update_cards(results: dict | None, root: Path = ROOT) -> list[Path]:
    """Write the "On a GPU" line into every chapter's resource card; returns the changed files."""
    changed = []
    for path in sorted(root.glob("chapters/*/*.ipynb")):
        text = path.read_text(encoding="utf-8")
        notebook = json.loads(text)
        chapter = path.relative_to(root).as_posix()
        for cell in notebook["cells"]:
            source = "".join(cell["source"])
            if cell["cell_type"] == "markdown" and "{admonition} Resource card" in source:
                new = card_with_gpu_line(source, card_gpu_line(results, chapter))
                cell["source"] = new.splitlines(keepends=True)
                break
        else:
            raise ValueError(f"{chapter} has no resource card (a Markdown cell with "
                             "':::{admonition} Resource card')")
        updated = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        if updated != text:
            path.write_text(updated, encoding="utf-8")
            changed.append(path)
    return changed


def update_intro(results: dict | None) -> None:
    text = INTRO.read_text(encoding="utf-8")
    INTRO.write_text(intro_with_gpu_column(text, results), encoding="utf-8")


def main(argv: list[str]) -> int:
    if "--update-intro" in argv:
        update_intro(load_results())
        update_cards(load_results())
        return 0
    every = sorted(ROOT.glob("chapters/*/*.ipynb"))
    chapters = argv or [p.relative_to(ROOT).as_posix() for p in every]
    name = gpu_name()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("LLMS_EXECUTED_BUILD", "1")
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)
    rows = []
    for chapter in chapters:
        rows.append(run_chapter(chapter, ROOT / "_build" / "gpu-executed"))
        row = rows[-1]
        print(f"{chapter}: {'pass' if row['passed'] else 'FAIL'}, {row['runtime_min']:.1f} min,"
              f" {row['peak_gpu_gib']:.1f} GiB GPU", flush=True)
    passed = sum(row["passed"] for row in rows)
    results = {"gpu": name, "date": datetime.date.today().isoformat(), "chapters": rows,
               "summary": f"{passed} of {len(rows)} chapters passed."}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    REPORT.write_text(report(results))
    update_intro(results)
    update_cards(results)
    print(f"{results['summary']} Wrote {RESULTS.relative_to(ROOT)}, {REPORT.relative_to(ROOT)},"
          " intro.md's GPU column and the resource cards' GPU lines")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
