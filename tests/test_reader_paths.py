"""Every way a reader runs the book (issue 15): Colab's requirements, the one setup cell, the one
repository URL, the Binder note and the GPU column."""
from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from IPython.core.inputtransformer2 import TransformerManager

ROOT = Path(__file__).resolve().parent.parent

#: What Colab must keep (its CUDA torch, its kernel, its scientific stack): never pinned for Colab.
COLAB_KEEPS = {
    "torch", "numpy", "pandas", "matplotlib", "scipy", "scikit-learn", "ipython", "ipykernel",
}
#: torch's CUDA stack, also Colab's own.
COLAB_KEEPS_PATTERN = re.compile(r"nvidia-.*|triton|cuda-.*")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not pinned exactly (name==version)"
            pins[_normal(name)] = version.strip()
    return pins


def _top_level_imports(source: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def imported_modules() -> dict[str, set[str]]:
    """Top-level module -> the files (code cells of chapters, utils modules) importing it."""
    where: dict[str, set[str]] = {}
    transform = TransformerManager().transform_cell  # turns %magics and !shell lines into Python
    for path in sorted(ROOT.glob("chapters/*/*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                for name in _top_level_imports(transform("".join(cell["source"]))):
                    where.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    for path in sorted((ROOT / "utils").glob("*.py")):
        for name in _top_level_imports(path.read_text()):
            where.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    return where


def test_colab_installs_every_directly_imported_distribution_at_the_book_version():
    required, colab = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-colab.txt")
    colab |= _pins(ROOT / "requirements-assets.txt")  # colab_setup.sh installs these --no-deps
    distributions = packages_distributions()
    problems = []
    for module, files in sorted(imported_modules().items()):
        if module in sys.stdlib_module_names or module == "utils":
            continue
        dists = distributions.get(module)
        if not dists:
            problems.append(f"{module} (imported in {sorted(files)[0]}) is not installed here")
            continue
        for dist in map(_normal, dists):
            if dist in COLAB_KEEPS or COLAB_KEEPS_PATTERN.fullmatch(dist):
                continue
            if dist not in colab:
                problems.append(f"{dist} (import {module}, in {sorted(files)[0]}) is not in "
                                f"requirements-colab.txt: add {dist}=={required.get(dist, '?')}")
    assert not problems, "\n".join(problems)


def test_colab_pins_equal_the_book_pins_and_leave_colabs_own_alone():
    required, colab = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-colab.txt")
    for dist, version in colab.items():
        assert dist not in COLAB_KEEPS and not COLAB_KEEPS_PATTERN.fullmatch(dist), (
            f"requirements-colab.txt pins {dist}, which Colab must keep: remove it")
        assert required.get(dist) == version, (
            f"requirements-colab.txt pins {dist}=={version} but requirements.txt has "
            f"{dist}=={required.get(dist)}: make them equal")
    comment = (ROOT / "requirements-colab.txt").read_text()
    assert "what Colab lacks or ships in another version" in comment


def test_the_import_reader_sees_magics_and_every_import_form():
    source = TransformerManager().transform_cell(
        "%matplotlib inline\nimport a.b, c\nfrom d.e import f\nfrom . import g\n!pip list\n")
    assert _top_level_imports(source) == {"a", "c", "d"}


def test_the_colab_setup_script_guards_torch_and_converts_the_model():
    script = (ROOT / "scripts" / "colab_setup.sh").read_text()
    assert "prepare_assets()" in script and "torch_before" in script and "exit 1" in script
    assert "requirements-colab.txt" in script and "--no-deps -r" in script


# --- one setup cell, one repository URL -------------------------------------------------------

def test_every_chapter_has_the_generated_setup_cell():
    setup_cell = _script("setup_cell")
    expected = setup_cell.setup_cell_source(*setup_cell.repository())
    chapters = setup_cell.chapters()
    assert len(chapters) >= 20
    for path in chapters:
        cell = setup_cell.setup_cell(json.loads(path.read_text()), path)
        assert "".join(cell["source"]) == expected, (
            f"{path.relative_to(ROOT)}: the setup cell differs from the template: "
            "run `python scripts/setup_cell.py`")
        assert "hide-input" in cell["metadata"].get("tags", [])


def test_readme_intro_and_launch_buttons_name_one_repository():
    setup_cell = _script("setup_cell")
    url, branch = setup_cell.repository()
    slug = url.removeprefix("https://github.com/")
    for name in setup_cell.MARKDOWN_FILES:
        found = setup_cell.repository_addresses((ROOT / name).read_text())
        assert found, f"{name} names no repository address"
        for other_slug, other_branch in found:
            assert other_slug == slug and other_branch in (None, branch), (
                f"{name} points at {other_slug} ({other_branch}), _config.yml at {url} ({branch}): "
                "run `python scripts/setup_cell.py`")
    # the launch buttons read repository.url, the only GitHub address in _config.yml
    assert (ROOT / "_config.yml").read_text().count("github.com/") == 1
    assert setup_cell.main(["--check"]) == 0


def test_the_writer_changes_only_the_setup_cell_and_keeps_the_layout(tmp_path):
    setup_cell = _script("setup_cell")
    chapter = ROOT / "chapters" / "1-transformers" / "03-attention.ipynb"
    notebook = json.loads(chapter.read_text())
    notebook["cells"][1]["source"] = ["# Setup: an old cell\n", "import sys"]
    notebook["cells"][1]["metadata"] = {}
    copy = tmp_path / "chapter.ipynb"
    copy.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
    source = setup_cell.setup_cell_source("https://github.com/someone/fork", "dev")
    assert setup_cell.write_chapter(copy, source, check=True)  # --check reports, writes nothing
    assert "an old cell" in copy.read_text()
    assert setup_cell.write_chapter(copy, source, check=False)
    assert not setup_cell.write_chapter(copy, source, check=False)  # a second pass changes nothing
    written = json.loads(copy.read_text())
    assert "".join(written["cells"][1]["source"]) == source
    assert '--branch dev"\n        " https://github.com/someone/fork llms-executed"' in source
    assert written["cells"][1]["metadata"]["tags"] == ["hide-input"]
    assert written["cells"][2:] == notebook["cells"][2:]
    assert written["metadata"] == notebook["metadata"]
    assert copy.read_text() == json.dumps(written, indent=1, ensure_ascii=False) + "\n"
    notebook["cells"][1]["source"] = ["print('not the setup cell')"]
    copy.write_text(json.dumps(notebook))
    with pytest.raises(SystemExit, match="not the setup cell"):
        setup_cell.write_chapter(copy, source, check=False)


def test_addresses_follow_the_configured_repository():
    setup_cell = _script("setup_cell")
    text = ("https://github.com/a/b/tree/dev/data, (https://github.com/a/b), "
            "https://colab.research.google.com/github/a/b/blob/dev/x.ipynb, "
            "https://mybinder.org/v2/gh/a/b/dev")
    moved = setup_cell.addresses(text, "https://github.com/o/n", "main")
    assert moved == ("https://github.com/o/n/tree/main/data, (https://github.com/o/n), "
                     "https://colab.research.google.com/github/o/n/blob/main/x.ipynb, "
                     "https://mybinder.org/v2/gh/o/n/main")
    assert setup_cell.repository_addresses(moved) == {("o/n", "main"), ("o/n", None)}


def test_the_repository_setting_must_be_a_github_url(tmp_path):
    setup_cell = _script("setup_cell")
    config = tmp_path / "_config.yml"
    config.write_text("repository:\n  url: https://gitlab.com/a/b\n")
    with pytest.raises(SystemExit, match="repository.url"):
        setup_cell.repository(config)
    config.write_text("repository:\n  url: https://github.com/a/b/\n")
    assert setup_cell.repository(config) == ("https://github.com/a/b", "main")


# --- the safetensors cache message ---------------------------------------------------------------

def test_is_converted_only_for_a_finished_current_cache(tmp_path, monkeypatch):
    from utils import models

    monkeypatch.setenv("LLMS_EXECUTED_CACHE", str(tmp_path))
    assert not models.is_converted()
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    (folder / "SOURCE.json").write_text("{not json")
    assert not models.is_converted()
    asset = models.KNOWN_MODELS["smollm2-135m-instruct"]
    (folder / "SOURCE.json").write_text(json.dumps({"format": -1, "package": asset.pip_spec}))
    assert not models.is_converted()
    current = {"format": models._CACHE_FORMAT, "package": asset.pip_spec}
    (folder / "SOURCE.json").write_text(json.dumps(current))
    assert models.is_converted("SmolLM2-135M-Instruct")


# --- Binder and the GPU column ------------------------------------------------------------------

README_TABLE = """<!-- costs:start -->
Measured on 2-core CPU, no GPU; torch 2.13.0+cpu, 2026-12-03, while `make nbval` executed:

| Chapter | Run time | Peak memory |
|---|---|---|
| Small (`chapters/1-a/01-small.ipynb`) | 0.6 min | 1.8 GiB |
| Big: yes (`chapters/2-b/02-big.ipynb`) | 1.2 min | 2.8 GiB |
| **All 2 chapters** (sum of run times; largest peak) | 1.8 min | 2.8 GiB |
<!-- costs:end -->"""


def test_binder_note_lists_the_chapters_above_binders_limit_from_the_readme_table():
    binder_fit = _script("binder_fit")
    note = binder_fit.binder_note(README_TABLE)
    assert "Measured on 2026-12-03 (2-core CPU, no GPU; torch 2.13.0+cpu)" in note
    assert "1 of 2 chapters" in note and "- [Big: yes](chapters/2-b/02-big.ipynb): 2.8 GiB" in note
    assert "01-small" not in note  # 1.8 GiB fits under 2 GB = 1.86 GiB
    fits = binder_fit.binder_note(README_TABLE.replace("2.8 GiB |\n| **", "1.2 GiB |\n| **"))
    assert fits.endswith("every chapter's peak memory fits.")
    intro = f"a\n{binder_fit.START}\nold\n{binder_fit.END}\nb"
    assert binder_fit.with_note(intro, "new") == f"a\n{binder_fit.START}\nnew\n{binder_fit.END}\nb"
    with pytest.raises(SystemExit, match="Measured on"):
        binder_fit.binder_note("<!-- costs:start -->\n<!-- costs:end -->")


def test_intro_binder_list_matches_the_readme_costs():
    assert _script("binder_fit").main(["--check"]) == 0, "run python scripts/binder_fit.py"


def test_intro_gpu_column_is_not_yet_measured_without_a_gpu_run_and_labelled_with_one():
    gpu_check = _script("gpu_check")
    table = ("| Chapter | Hardware | Run time | Peak memory |\n|---|---|---|---|\n"
             "| [A](chapters/1-a/01-a.ipynb) | CPU | 1 min | 2 GiB |\n"
             "| [B](chapters/1-a/02-b.ipynb) | CPU | 1 min | 2 GiB |\n")
    unmeasured = gpu_check.intro_with_gpu_column(table, None)
    assert unmeasured.count("| not yet measured |") == 2 and "| Peak memory | GPU |" in unmeasured
    results = {"gpu": "NVIDIA H200, torch 2.13.0, CUDA 12.8", "date": "2026-12-05", "summary": "",
               "chapters": [{"chapter": "chapters/1-a/01-a.ipynb", "passed": True,
                             "runtime_min": 0.42, "peak_gpu_gib": 1.26, "log_tail": ""},
                            {"chapter": "chapters/1-a/02-b.ipynb", "passed": False,
                             "runtime_min": 0.1, "peak_gpu_gib": 0.5,
                             "log_tail": "AssertionError"}]}
    measured = gpu_check.intro_with_gpu_column(unmeasured, results)
    assert "| GPU: NVIDIA H200, torch 2.13.0, CUDA 12.8, 2026-12-05 |" in measured
    assert "| 2 GiB | 0.4 min, 1.3 GiB |" in measured and "| fails (see measurements" in measured
    assert gpu_check.intro_with_gpu_column(measured, results) == measured  # rerunning is harmless
    report = gpu_check.report(results)
    assert "| `chapters/1-a/01-a.ipynb` | pass | 0.4 min | 1.3 GiB |" in report
    assert "**FAIL**" in report and "AssertionError" in report
    intro = (ROOT / "intro.md").read_text()
    assert gpu_check.intro_with_gpu_column(intro, gpu_check.load_results()) == intro, (
        "intro.md's GPU column is stale: run python scripts/gpu_check.py --update-intro")


def test_resource_cards_carry_the_gpu_line_written_from_the_gpu_run(tmp_path):
    gpu_check = _script("gpu_check")
    card = (":::{admonition} Resource card\n- **Measured cost of this page:** {glue:text}"
            "`chapter_runtime_min:.1f` minutes, on {glue:text}`chapter_machine`.\n:::")
    unmeasured = gpu_check.card_with_gpu_line(card, gpu_check.card_gpu_line(None, "c.ipynb"))
    assert "- **On a GPU:** not yet measured" in unmeasured
    results = {"gpu": "NVIDIA H200", "date": "2026-12-05", "summary": "",
               "chapters": [{"chapter": "c.ipynb", "passed": True, "runtime_min": 0.42,
                             "peak_gpu_gib": 1.26, "log_tail": ""}]}
    measured = gpu_check.card_with_gpu_line(unmeasured, gpu_check.card_gpu_line(results, "c.ipynb"))
    assert "passes in 0.4 minutes with 1.3 GiB peak GPU memory on NVIDIA H200" in measured
    assert measured.count("**On a GPU:**") == 1
    with pytest.raises(ValueError, match="measured-cost bullet"):
        gpu_check.card_with_gpu_line(":::{admonition} Resource card\n:::", "- **On a GPU:** x")
    results = gpu_check.load_results()
    for path in sorted(ROOT.glob("chapters/*/*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        card = next("".join(c["source"]) for c in cells if "Resource card" in "".join(c["source"]))
        line = gpu_check.card_gpu_line(results, path.relative_to(ROOT).as_posix())
        assert line in card, f"{path.name}: run python scripts/gpu_check.py --update-intro"
