import sys

import matplotlib as mpl
import pytest

from utils import book
from utils.attention import causal_mask


def test_show_source_renders_the_code_and_its_file():
    shown = book.show_source(causal_mask)
    assert "```python\ndef causal_mask(" in shown.data
    assert "utils/attention.py" in shown.data


def test_show_source_rejects_objects_without_source():
    with pytest.raises(TypeError, match="defined in a file"):
        book.show_source(42)


def test_glue_returns_the_value_with_and_without_myst_nb(monkeypatch):
    assert book.glue("answer", 42) == 42
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # as in Colab: import fails
    assert book.glue("answer", 43) == 43


def test_progress_is_a_plain_text_bar_on_stdout_interactively(capsys, monkeypatch):
    monkeypatch.delenv("LLMS_EXECUTED_BUILD", raising=False)
    assert list(book.progress(range(3), desc="counting")) == [0, 1, 2]
    out = capsys.readouterr().out
    assert "counting" in out and "3/3" in out


def test_progress_prints_one_summary_line_in_a_book_build(capsys, monkeypatch):
    monkeypatch.setenv("LLMS_EXECUTED_BUILD", "1")
    assert list(book.progress(iter("abcd"), desc="letters")) == list("abcd")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\r" not in out
    assert out.startswith("letters: 4 iterations in ")


def test_book_style_sets_an_opaque_white_figure():
    book.use_book_style()
    assert mpl.rcParams["figure.facecolor"] == "white"


def test_chapter_clock_reports_runtime_memory_and_machine():
    stats = book.ChapterClock().finish(prefix="t_")
    assert stats["t_runtime_min"] >= 0
    assert stats["t_peak_rss_gib"] > 0
    assert "core" in stats["t_machine"]


def test_glue_turns_numpy_and_torch_scalars_into_python_numbers():
    import numpy as np
    import torch

    assert type(book.glue("np_scalar", np.float64(1.5))) is float
    assert type(book.glue("torch_scalar", torch.tensor(3))) is int
