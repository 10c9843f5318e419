"""Helpers for writing chapters: show reused source, glue numbers into prose, progress bars,
one plotting style, and the measured resource card."""
from __future__ import annotations

import inspect
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from utils.measure import describe_machine, process_peak_rss_bytes
from utils.paths import REPO_ROOT


__all__ = [
    "show_source",
    "glue",
    "progress",
    "use_book_style",
    "ChapterClock",
]


T = TypeVar("T")


def show_source(obj: object) -> object:
    """Display the source of a ``utils`` function or class where a chapter teaches it.

    The code lives once in ``utils`` (tested, reused by later chapters); the chapter shows it
    with this call and then uses it. Returns a Markdown object that renders as a highlighted
    code block in Jupyter, Colab and the built book.
    """
    from IPython.display import Markdown

    try:
        source = inspect.getsource(obj)
        path = Path(inspect.getsourcefile(obj)).resolve()
    except (TypeError, OSError) as err:
        raise TypeError(f"show_source needs a function, class or module defined in a file, got {obj!r}") from err
    try:
        where = path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        where = path.name
    name = getattr(obj, "__qualname__", getattr(obj, "__name__", ""))
    return Markdown(f"`{name}`, from `{where}`:\n\n```python\n{source.rstrip()}\n```")


def glue(name: str, value: object, display: bool = False) -> object:
    """Store ``value`` under ``name`` for the prose (``{glue:text}`name```) via myst-nb.

    NumPy and one-element torch scalars are stored as plain Python numbers, so that format specs such
    as ``:.2f`` work in the prose. Without myst-nb (e.g. in Colab) this only returns the value.
    """
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    try:
        from myst_nb import glue as _glue
    except ImportError:
        return value
    _glue(name, value, display=display)
    return value


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None) -> Iterator[T]:
    """A progress bar that renders as one line both in Jupyter/Colab and in the built book.

    Interactively: a plain-text ``tqdm`` bar on stdout (``tqdm.auto`` would pick a widget bar, which a
    static page shows as scattered outputs or not at all). While the book is being built or tested
    (``LLMS_EXECUTED_BUILD=1``, set by the Makefile), the page cannot redraw a line, so the
    bar's many updates would pile up; then one summary line is printed at the end instead.
    """
    if os.environ.get("LLMS_EXECUTED_BUILD") != "1":
        from tqdm.std import tqdm

        yield from tqdm(iterable, desc=desc, total=total, file=sys.stdout, ascii=True, ncols=80)
        return
    start, count = time.perf_counter(), 0
    for count, item in enumerate(iterable, start=1):
        yield item
    elapsed = time.perf_counter() - start
    print(f"{desc}: {count} iterations in {elapsed:.1f} s ({elapsed / max(count, 1):.2f} s/it)")


def use_book_style() -> None:
    """One matplotlib style for every figure: readable on light and dark pages."""
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "figure.figsize": (6.4, 3.8),
            "figure.dpi": 110,
            "figure.facecolor": "white",  # an opaque card, legible under the dark theme too
            "axes.facecolor": "white",
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.frameon": False,
            "savefig.bbox": "tight",
        }
    )


class ChapterClock:
    """Measures a chapter's own cost for its resource card: wall time and peak memory.

    Start it in the first cell; call :meth:`finish` in the last, which glues
    ``<prefix>runtime_min``, ``<prefix>peak_rss_gib`` and ``<prefix>machine`` for the card.
    The peak is the notebook process's own, plus, for chapters that launch worker processes
    (Part 8), the summed peaks of the largest launch's workers.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def finish(self, prefix: str = "chapter_") -> dict[str, object]:
        stats = {
            f"{prefix}runtime_min": (time.perf_counter() - self.start) / 60,
            f"{prefix}peak_rss_gib": process_peak_rss_bytes(include_workers=True) / 2**30,
            f"{prefix}machine": describe_machine(),
        }
        for key, value in stats.items():
            glue(key, value)
        return stats
