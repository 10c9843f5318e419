"""Uncertainty for every comparison, and the one place that turns a comparison into words.

A chapter that compares two measured results takes its verdict word from this module (and glues
it), so the prose can never say more than the numbers allow. The decision rules, stated once:

- **Metrics** (:func:`compare_metric`): two metrics measured on the *same* items (or seeds) are
  compared by the paired bootstrap of ``mean(a - b)`` (``N_BOOT`` resamples, percentile interval at
  ``LEVEL``). The verdict is "higher" or "lower" only when that interval excludes 0; otherwise the
  two "cannot be told apart at n = ...". With one item or one seed there is no interval: the text
  says "(single run)".
- **Times** (:func:`compare_times`): the ratio is ``median(new) / median(base)`` of repeated
  timings, so a ratio below 1 is a speed-up. How sure the direction is depends on how many repeats
  there are:

  * ``MIN_TIMING_REPEATS`` (3) to ``BOOTSTRAP_TIMING_REPEATS - 1`` (5) repeats each: the range of
    every pairwise ratio of repeats, ``[min(new) / max(base), max(new) / min(base)]``. "faster" or
    "slower" only when that whole range lies on one side of 1, i.e. every repeat of one beat every
    repeat of the other (a chance ordering this clean has probability 2 / C(6, 3) = 0.1 with 3
    each, 2 / C(10, 5) = 0.008 with 5 each).
  * ``BOOTSTRAP_TIMING_REPEATS`` (6) or more each: that all-pairs rule would get *stricter* as
    repeats are added (one slow outlier among 30 vetoes it), so the range is replaced by a bootstrap
    percentile interval of the ratio of medians at ``LEVEL`` (each side resampled on its own,
    ``N_BOOT`` times); "faster" or "slower" when that interval excludes 1.
  * Both rules treat repeats as independent draws. On a shared machine whose load drifts, time the
    two ways in alternating rounds (one call of each per round), not in two blocks one after the
    other: with blocks, a load change between them reads as a confident difference (1-09 once gave
    "1.4× slower" and then "1.4× faster" on two runs that way).
  * Otherwise the times are "within noise". With fewer than ``MIN_TIMING_REPEATS`` repeats the word
    is the measured direction and the text says "(single run)" or "(only 2 repeats)".

- **Too few items** (:func:`compare_metric`): below ``MIN_METRIC_ITEMS`` (5) paired items a
  bootstrap has too few distinct resamples to mean anything, so the word is the measured direction
  and the text says "(only n = 3 items, too few for an interval)"; ``decided`` is False.

Intervals for a single mean (:func:`mean_ci`, bootstrap) and a single rate (:func:`proportion_ci`,
Wilson) and the spread of repeated timings (:func:`timing_summary`, median with min-max)
complete it.
Every function checks its input (empty, NaN, mismatched lengths) and says what to fix.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


__all__ = [
    "LEVEL",
    "N_BOOT",
    "MIN_TIMING_REPEATS",
    "BOOTSTRAP_TIMING_REPEATS",
    "MIN_METRIC_ITEMS",
    "ratio_text",
    "is_speedup",
    "Estimate",
    "TimingSummary",
    "Verdict",
    "mean_ci",
    "proportion_ci",
    "paired_difference",
    "timing_summary",
    "single_run",
    "compare_metric",
    "compare_times",
]


LEVEL = 0.95
"""Confidence level of every interval unless a call says otherwise."""
N_BOOT = 2000
"""Bootstrap resamples for :func:`mean_ci`, :func:`paired_difference` and :func:`compare_metric`."""
MIN_TIMING_REPEATS = 3
"""Repeats each side needs before :func:`compare_times` may call a time faster or slower."""
BOOTSTRAP_TIMING_REPEATS = 6
"""From this many repeats each, :func:`compare_times` decides by a bootstrap interval of the ratio
of medians instead of the all-pairs range (which gets stricter, not surer, with more repeats)."""
MIN_METRIC_ITEMS = 5
"""Paired items :func:`compare_metric` needs before it gives an interval and a decided verdict."""

_BOOT_CHUNK = 4_000_000  # resampled values held in memory at once


# --------------------------------------------------------------------------- formatting


def _sig(x: float, digits: int = 2) -> str:
    """``x`` with ``digits`` significant figures, never in scientific notation."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    return f"{x:.{decimals}f}"


def _value_text(x: float) -> str:
    return _sig(x, 3)


def _ratio_sig(ratio: float) -> str:
    """Two significant figures, or three where two would print a ratio other than 1 as "1.0"."""
    text = _sig(ratio)
    return _sig(ratio, 3) if text in ("1", "1.0") and ratio != 1 else text


def ratio_text(ratio: float) -> str:
    """A time ratio read in the right direction: ``0.59`` -> "0.59× the time (1.7× faster)".

    A ratio below 1 is a speed-up, above 1 a slow-down. The words follow the number, but say
    nothing about noise: use :func:`compare_times` when you have the repeated timings.
    """
    _check_ratio(ratio)
    if ratio < 1:
        return f"{_ratio_sig(ratio)}× the time ({_ratio_sig(1 / ratio)}× faster)"
    if ratio > 1:
        return f"{_ratio_sig(ratio)}× the time (slower)"
    return "the same time"


def is_speedup(ratio: float) -> bool:
    """True when ``ratio = new time / baseline time`` is a speed-up, i.e. below 1."""
    _check_ratio(ratio)
    return ratio < 1


def _check_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float, np.floating, np.integer)) or not math.isfinite(ratio) \
            or ratio <= 0:
        raise ValueError(f"a time ratio must be a finite number > 0 (new time / baseline time), "
                         f"got {ratio!r}")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Estimate:
    """A value with its interval ``[lo, hi]`` at ``level``, from ``n`` items.

    ``str(estimate)`` (or ``.text``) reads like "0.713 [0.65, 0.77]"; with ``n = 1`` there is no
    interval and it reads "0.713 (single run)". A format spec applies to all three numbers:
    ``f"{estimate:.1%}"`` -> "71.3% [65.0%, 77.0%]".
    """

    value: float
    lo: float
    hi: float
    n: int
    level: float = LEVEL

    @property
    def text(self) -> str:
        return format(self, "")

    @property
    def width(self) -> float:
        """``hi - lo``."""
        return self.hi - self.lo

    def excludes(self, x: float) -> bool:
        """True when ``x`` lies outside the interval (a decision at this level)."""
        return self.n > 1 and (self.lo > x or self.hi < x)

    def __format__(self, spec: str) -> str:
        if spec:
            value, lo, hi = (format(v, spec) for v in (self.value, self.lo, self.hi))
        else:
            value, lo, hi = _value_text(self.value), _sig(self.lo), _sig(self.hi)
        if self.n == 1:
            return f"{value} (single run)"
        return f"{value} [{lo}, {hi}]"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class TimingSummary:
    """The spread of repeated timings, in seconds: median, quartiles, min and max over ``n``.

    ``str()`` (or ``.text``) reads like "1.18 ms (1.10–1.31 ms, n = 5)": the median, then the
    range of the repeats.
    """

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def text(self) -> str:
        scale, unit = _time_unit(self.median)
        median = _sig(self.median * scale, 3)
        if self.n == 1:
            return f"{median} {unit} (single run)"
        lo, hi = _sig(self.min * scale, 3), _sig(self.max * scale, 3)
        return f"{median} {unit} ({lo}–{hi} {unit}, n = {self.n})"

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Verdict:
    """A comparison in words: ``word`` for the prose, ``text`` the glue-ready phrase.

    ``word`` is "higher" / "lower" / "cannot be told apart" for metrics (:func:`compare_metric`)
    and "faster" / "slower" / "within noise" for times (:func:`compare_times`). ``estimate`` is the
    difference ``a - b`` (metrics) or the ratio ``new / base`` (times) with its interval.
    ``decided`` is True when the rule in the module docstring could tell the two apart;
    ``better`` says whether ``a`` (or ``new``) is the better one (None when undecided);
    ``single_run`` is True when there was nothing to estimate noise from.
    """

    word: str
    text: str
    estimate: Estimate
    decided: bool
    better: bool | None
    single_run: bool = False

    def __str__(self) -> str:
        return self.text

    def __format__(self, spec: str) -> str:
        return format(self.text, spec)


# --------------------------------------------------------------------------- input checks


def _as_values(values: Iterable[float] | np.ndarray, name: str = "values") -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)) or np.isscalar(values):
        raise TypeError(f"{name} must be a sequence of numbers (one per item, seed or repeat), "
                        f"got {type(values).__name__}; wrap a single value in a list")
    try:
        array = np.asarray(list(values) if not isinstance(values, np.ndarray) else values,
                           dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of numbers, got {values!r}") from err
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (one number per item), got shape "
                         f"{array.shape}; flatten it or compare one column at a time")
    if array.size == 0:
        raise ValueError(f"{name} is empty: an estimate needs at least one measured value")
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} NaN or infinite value(s) out of {array.size}; drop or "
                         f"fix the failed measurements before estimating")
    return array


def _check_level(level: float) -> None:
    if not isinstance(level, (int, float)) or not 0 < level < 1:
        raise ValueError(f"level must be a number strictly between 0 and 1 (e.g. 0.95), "
                         f"got {level!r}")


def _check_n_boot(n_boot: int) -> None:
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100 (resamples of the bootstrap), "
                         f"got {n_boot!r}")


def _times(seconds: Sequence[float] | object, name: str) -> np.ndarray:
    seconds = getattr(seconds, "times_s", seconds)  # accept utils.measure.Timing
    array = _as_values(seconds, name)
    if (array <= 0).any():
        raise ValueError(f"{name} must be positive durations in seconds, got "
                         f"{array[array <= 0][:3].tolist()}")
    return array


# --------------------------------------------------------------------------- estimates


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` means of resamples (with replacement) of ``x``, in bounded memory."""
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_CHUNK // x.size)
    means = []
    for start in range(0, n_boot, rows):
        idx = rng.integers(0, x.size, size=(min(rows, n_boot - start), x.size))
        means.append(x[idx].mean(axis=1))
    return np.concatenate(means)


def _percentile_interval(x: np.ndarray, level: float, n_boot: int, seed: int) -> Estimate:
    value = float(x.mean())
    if x.size == 1:
        return Estimate(value, value, value, 1, level)
    means = _bootstrap_means(x, n_boot, seed)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return Estimate(value, float(lo), float(hi), int(x.size), level)


def mean_ci(values: Iterable[float], level: float = LEVEL, n_boot: int = N_BOOT,
            seed: int = 0) -> Estimate:
    """The mean of ``values`` with a bootstrap percentile interval at ``level``.

    Use it for per-item scores (F1 per question, loss per sequence, one number per seed). For a
    rate of successes out of ``n`` prefer :func:`proportion_ci`. One value gives a "single run"
    estimate with no interval.
    """
    _check_level(level)
    _check_n_boot(n_boot)
    return _percentile_interval(_as_values(values), level, n_boot, seed)


def proportion_ci(successes: int, n: int, level: float = LEVEL) -> Estimate:
    """A rate ``successes / n`` with its Wilson score interval at ``level``.

    The Wilson interval stays inside [0, 1] and is sensible at 0 or ``n`` successes, where the
    textbook ``p ± z·sqrt(p(1-p)/n)`` collapses to a point.
    """
    _check_level(level)
    for name, value in (("successes", successes), ("n", n)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int (a count), got {value!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (the number of trials), got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..n = 0..{n}, got {successes}")
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, lo, hi, int(n), level)


def paired_difference(a: Iterable[float], b: Iterable[float], level: float = LEVEL,
                      n_boot: int = N_BOOT, seed: int = 0) -> Estimate:
    """``mean(a - b)`` for two metrics on the same items, with a paired bootstrap interval.

    Pairing (resampling items, keeping each item's ``a`` and ``b`` together) removes the
    item-to-item variation both share, so it detects differences an unpaired comparison misses.
    """
    _check_level(level)
    _check_n_boot(n_boot)
    a, b = _as_values(a, "a"), _as_values(b, "b")
    if a.size != b.size:
        raise ValueError(f"a and b must be measured on the same items, got {a.size} and {b.size} "
                         f"values; pass one value per item for each, in the same order")
    return _percentile_interval(a - b, level, n_boot, seed)


def timing_summary(seconds: Sequence[float] | object) -> TimingSummary:
    """Median, quartiles, min and max of repeated timings (seconds, or a ``measure.Timing``)."""
    x = _times(seconds, "seconds")
    q1, median, q3 = (float(v) for v in np.quantile(x, [0.25, 0.5, 0.75]))
    return TimingSummary(median, q1, q3, float(x.min()), float(x.max()), int(x.size))


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 1:
        return 1.0, "s"
    if seconds >= 1e-3:
        return 1e3, "ms"
    return 1e6, "µs"


# --------------------------------------------------------------------------- verdicts


def _n_text(n: int, unit: str) -> str:
    return f"n = {n}" + (f" {unit}" if unit else "")


def single_run(a: float, b: float, higher_is_better: bool = True, label: str = "single run",
               ) -> Verdict:
    """Two metrics measured once each (one seed, one run): the direction, marked as such.

    ``label`` is what the text calls it, e.g. "one seed". The word is "higher", "lower" or
    "equal", ``decided`` is False and the text says "(single run)" so the prose cannot claim a win.
    """
    a_, b_ = (float(_as_values([v], name)[0]) for v, name in ((a, "a"), (b, "b")))
    diff = a_ - b_
    estimate = Estimate(diff, diff, diff, 1)
    word = "higher" if diff > 0 else "lower" if diff < 0 else "equal"
    better = None if diff == 0 else (diff > 0) == higher_is_better
    text = f"{word} by {_sig(abs(diff))} ({label})" if diff else f"equal ({label})"
    return Verdict(word, text, estimate, decided=False, better=better, single_run=True)


def compare_metric(a: Iterable[float], b: Iterable[float], higher_is_better: bool = True,
                   level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0,
                   unit: str = "") -> Verdict:
    """Compare metric ``a`` with ``b`` measured on the same items (or seeds): the verdict words.

    ``a`` and ``b`` hold one value per item (0/1 correctness, F1, loss ...), in the same order.
    The word is "higher" or "lower" (``a`` relative to ``b``) when the paired bootstrap interval of
    ``mean(a - b)`` excludes 0, else "cannot be told apart". ``.text`` is glue-ready, e.g.
    "higher by 0.079 [0.021, 0.14], n = 24", "lower by 0.079 [0.021, 0.14], n = 24" (after "by",
    the size of the change and its interval, both positive) or "cannot be told apart at n = 24
    (difference 0.012 [-0.031, 0.055])" (the signed difference ``a - b``). ``unit`` names what n counts ("questions", "seeds"). ``higher_is_better``
    only sets ``.better``. With one item each it defers to :func:`single_run`; with fewer than
    ``MIN_METRIC_ITEMS`` it gives the direction of the mean difference, undecided, and says too few.
    """
    a, b = _as_values(a, "a"), _as_values(b, "b")
    diff = paired_difference(a, b, level=level, n_boot=n_boot, seed=seed)
    if diff.n == 1:
        return single_run(float(a[0]), float(b[0]), higher_is_better)
    if diff.n < MIN_METRIC_ITEMS:
        noun = unit or "items"
        verdict = single_run(diff.value, 0.0, higher_is_better,
                             label=f"only n = {diff.n} {noun}, too few for an interval")
        return Verdict(verdict.word, verdict.text, diff, decided=False, better=verdict.better)
    n = _n_text(diff.n, unit)
    interval = f"[{_sig(diff.lo)}, {_sig(diff.hi)}]"
    if diff.excludes(0):
        word = "higher" if diff.value > 0 else "lower"
        better = (diff.value > 0) == higher_is_better
        if word == "lower":  # "lower by 0.22 [0.093, 0.38]": the interval of the size of the drop
            interval = f"[{_sig(-diff.hi)}, {_sig(-diff.lo)}]"
        text = f"{word} by {_sig(abs(diff.value))} {interval}, {n}"
        return Verdict(word, text, diff, decided=True, better=better)
    word = "cannot be told apart"
    text = f"{word} at {n} (difference {_sig(diff.value)} {interval})"
    return Verdict(word, text, diff, decided=False, better=None)


def _bootstrap_median_ratio(new: np.ndarray, base: np.ndarray, level: float, n_boot: int,
                            seed: int) -> tuple[float, float]:
    """Percentile interval of ``median(new*) / median(base*)``, each side resampled on its own."""
    rng = np.random.default_rng(seed)
    new_medians = np.median(new[rng.integers(0, new.size, size=(n_boot, new.size))], axis=1)
    base_medians = np.median(base[rng.integers(0, base.size, size=(n_boot, base.size))], axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(new_medians / base_medians, [alpha, 1 - alpha])
    return float(lo), float(hi)


def compare_times(new_seconds: Sequence[float] | object, base_seconds: Sequence[float] | object,
                  level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> Verdict:
    """Compare repeated timings of a new way with a baseline: "faster" / "slower" / "within noise".

    Arguments are lists of seconds (or ``utils.measure.Timing``). The ratio is
    ``median(new) / median(base)``, so below 1 is a speed-up; ``.text`` reads "0.59× the time
    (1.7× faster)", "1.5× the time (slower)" or "0.95× the time (within noise)", and
    ``.estimate`` holds the ratio with its range. The rule (module docstring): with 3-5 repeats
    each, a direction only when every pairwise ratio of repeats lies on one side of 1; with
    ``BOOTSTRAP_TIMING_REPEATS`` or more each, when the bootstrap interval of the ratio of medians
    at ``level`` excludes 1.
    """
    _check_level(level)
    _check_n_boot(n_boot)
    new, base = _times(new_seconds, "new_seconds"), _times(base_seconds, "base_seconds")
    ratio = float(np.median(new) / np.median(base))
    n = int(min(new.size, base.size))
    if n >= BOOTSTRAP_TIMING_REPEATS:
        lo, hi = _bootstrap_median_ratio(new, base, level, n_boot, seed)
    else:
        lo, hi = float(new.min() / base.max()), float(new.max() / base.min())
    estimate = Estimate(ratio, lo, hi, n, level)
    if n < MIN_TIMING_REPEATS:
        word = "faster" if ratio < 1 else "slower" if ratio > 1 else "within noise"
        note = "single run" if n == 1 else f"only {n} repeats"
        text = ratio_text(ratio)
        text = text[:-1] + f", {note})" if text.endswith(")") else f"{text} ({note})"
        better = None if ratio == 1 else ratio < 1
        return Verdict(word, text, estimate, decided=False, better=better, single_run=n == 1)
    if hi < 1:
        return Verdict("faster", ratio_text(ratio), estimate, decided=True, better=True)
    if lo > 1:
        return Verdict("slower", ratio_text(ratio), estimate, decided=True, better=False)
    return Verdict("within noise", f"{_ratio_sig(ratio)}× the time (within noise)", estimate,
                   decided=False, better=None)
