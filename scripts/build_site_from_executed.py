"""Build the site from notebooks that were already executed (by nbval in CI), without executing again.

    python scripts/build_site_from_executed.py _build/executed

Copies the book's sources into ``_build/site-src``, replaces every chapter with its executed copy
(failing if one is missing), turns execution off, and runs ``jupyter-book build -W``. The HTML lands
in ``_build/html``, exactly where ``make book`` puts it.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# Besides the pages: the configuration, the bibliography, and the claims-ledger Sphinx extension
# (_config.yml's local_extensions path is relative to the book's root).
BOOK_FILES = ["_config.yml", "_toc.yml", "references.bib", "scripts/claims_ledger.py"]


def toc_files(toc: dict) -> list[str]:
    """Every document named in _toc.yml (root included), without extension."""
    files = [toc["root"]]

    def walk(entries: list[dict]) -> None:
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            for key in ("chapters", "sections", "parts"):
                walk(entry.get(key, []))

    walk(toc.get("parts", []) + toc.get("chapters", []))
    return files


def main(executed_dir: str) -> int:
    executed = Path(executed_dir).resolve()
    src = ROOT / "_build" / "site-src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    for name in BOOK_FILES:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    missing = []
    for doc in toc_files(toc):
        for suffix in (".md", ".ipynb"):
            original = ROOT / f"{doc}{suffix}"
            if not original.exists():
                continue
            target = src / original.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            source = executed / original.relative_to(ROOT) if suffix == ".ipynb" else original
            if not source.exists():
                missing.append(str(original.relative_to(ROOT)))
                continue
            shutil.copy2(source, target)
    if missing:
        print(f"No executed copy of: {', '.join(missing)}. Run `make nbval` first.", file=sys.stderr)
        return 1
    config = yaml.safe_load((src / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # already executed, once, by nbval
    (src / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(ROOT / "_build" / "html", ignore_errors=True)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jupyter_book), "build", str(src), "-W", "--keep-going", "--path-output", str(ROOT)]
    return subprocess.run(cmd, cwd=ROOT).returncode


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
