import math

import numpy as np
import pytest
import torch

from utils.measure import Timing
from utils.stats import (
    LEVEL,
    MIN_TIMING_REPEATS,
    BOOTSTRAP_TIMING_REPEATS,
    MIN_METRIC_ITEMS,
    Estimate,
    compare_metric,
    compare_times,
    is_speedup,
    mean_ci,
    paired_difference,
    proportion_ci,
    ratio_text,
    single_run,
    timing_summary,
)


def test_mean_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = mean_ci(rng.normal(1.0, 1.0, 20))
    large = mean_ci(rng.normal(1.0, 1.0, 2000))
    for est in (small, large):
        assert est.lo <= est.value <= est.hi
    assert large.width < small.width / 5
    assert large.lo < 1.0 < large.hi
    assert small.level == LEVEL and small.n == 20


def test_mean_ci_is_reproducible_and_seeded():
    x = np.arange(30.0)
    assert mean_ci(x, seed=3) == mean_ci(x, seed=3)
    assert mean_ci(x, seed=3) != mean_ci(x, seed=4)


def test_mean_ci_coverage_is_near_the_level():
    rng = np.random.default_rng(1)
    hits = 0
    for i in range(200):
        est = mean_ci(rng.normal(0, 1, 40), n_boot=500, seed=i)
        hits += est.lo < 0 < est.hi
    assert 0.88 <= hits / 200 <= 0.99


def test_mean_ci_of_one_value_is_a_single_run():
    est = mean_ci([0.713])
    assert (est.lo, est.value, est.hi, est.n) == (0.713, 0.713, 0.713, 1)
    assert str(est) == "0.713 (single run)"
    assert not est.excludes(0)


def test_estimate_text_and_format_spec():
    est = Estimate(0.713, 0.6512, 0.7698, 24)
    assert str(est) == est.text == "0.713 [0.65, 0.77]"
    assert f"{est:.1%}" == "71.3% [65.1%, 77.0%]"
    assert est.excludes(0.5) and not est.excludes(0.7)


def test_mean_ci_accepts_tensors_and_large_inputs_in_bounded_memory():
    est = mean_ci(torch.ones(50))
    assert est.value == est.lo == est.hi == 1.0
    big = mean_ci(np.random.default_rng(0).random(200_000), n_boot=200)
    assert big.lo < 0.5 < big.hi


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ([1.0, float("nan")], "NaN"),
    ([1.0, float("inf")], "NaN or infinite"),
    ([[1.0, 2.0], [3.0, 4.0]], "one-dimensional"),
])
def test_mean_ci_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        mean_ci(bad)


def test_mean_ci_rejects_scalars_strings_and_bad_settings():
    with pytest.raises(TypeError, match="wrap a single value"):
        mean_ci(0.5)
    with pytest.raises(TypeError, match="sequence of numbers"):
        mean_ci(["a", "b"])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="n_boot"):
        mean_ci([1.0, 2.0], n_boot=10)


def test_proportion_ci_matches_the_wilson_formula():
    est = proportion_ci(17, 24)
    # Wilson 95 % for 17/24, computed by hand: centre (p + z²/2n)/(1 + z²/n)
    z = 1.959963984540054
    p, n = 17 / 24, 24
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert est.value == pytest.approx(p)
    assert est.lo == pytest.approx(centre - half) and est.hi == pytest.approx(centre + half)
    assert est.lo == pytest.approx(0.5081, abs=1e-3) and est.hi == pytest.approx(0.8510, abs=1e-3)


def test_proportion_ci_at_the_edges_stays_in_range_and_is_not_a_point():
    zero, full = proportion_ci(0, 10), proportion_ci(10, 10)
    assert zero.lo == 0.0 and 0 < zero.hi < 0.35
    assert full.hi == 1.0 and 0.65 < full.lo < 1


@pytest.mark.parametrize("args, err", [
    ((3, 0), ValueError), ((11, 10), ValueError), ((-1, 10), ValueError),
    ((2.5, 10), TypeError), ((True, 10), TypeError),
])
def test_proportion_ci_rejects_bad_counts(args, err):
    with pytest.raises(err):
        proportion_ci(*args)


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 5, 30)  # large item-to-item spread shared by both
    a, b = base + 0.5 + rng.normal(0, 0.1, 30), base
    paired = paired_difference(a, b)
    assert paired.excludes(0) and paired.value == pytest.approx(np.mean(a - b))
    # ignoring the pairing, the shared spread would swamp the 0.5 difference
    assert mean_ci(a).lo < mean_ci(b).hi


def test_paired_difference_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1.0, float("nan")], [1.0, 2.0])


def test_compare_metric_says_higher_lower_or_cannot_tell():
    rng = np.random.default_rng(3)
    a = rng.random(24)
    up = compare_metric(a + 0.08 + rng.normal(0, 0.02, 24), a, unit="questions")
    assert up.word == "higher" and up.decided and up.better is True
    assert up.text.startswith("higher by 0.08") and up.text.endswith("n = 24 questions")
    down = compare_metric(a - 0.08, a, higher_is_better=False)
    assert down.word == "lower" and down.better is True
    # After "by": the size of the drop and its interval, both positive.
    lo, hi = (float(x) for x in down.text.split("[")[1].split("]")[0].split(", "))
    assert 0 < lo <= 0.08 <= hi and down.text.startswith("lower by 0.080 [")
    tie = compare_metric(a + rng.normal(0, 0.2, 24), a)
    assert tie.word == "cannot be told apart" and not tie.decided and tie.better is None
    assert "cannot be told apart at n = 24 (difference" in tie.text
    assert str(tie) == tie.text and f"{tie}" == tie.text


def test_compare_metric_with_one_item_is_a_single_run():
    v = compare_metric([0.5], [0.4])
    assert v.single_run and not v.decided and v.word == "higher"
    assert v.text == "higher by 0.10 (single run)"


def test_single_run_marks_one_seed():
    v = single_run(3.2, 3.213, higher_is_better=False, label="one seed")
    assert v.text == "lower by 0.013 (one seed)" and v.better is True and not v.decided
    assert single_run(1.0, 1.0).word == "equal"


def test_compare_times_reads_ratios_in_the_right_direction():
    fast = compare_times([0.59, 0.6, 0.58, 0.61, 0.6], [1.0, 1.01, 0.99, 1.02, 1.0])
    assert fast.word == "faster" and fast.decided and fast.better is True
    assert fast.text == "0.60× the time (1.7× faster)"
    assert fast.estimate.value == pytest.approx(0.6) and fast.estimate.hi < 1
    slow = compare_times([1.5, 1.48, 1.49], [1.0, 1.01, 0.99])
    assert slow.word == "slower" and slow.text == "1.5× the time (slower)"


def test_compare_times_overlapping_repeats_are_within_noise():
    v = compare_times([0.95, 1.1, 0.9], [1.0, 1.01, 0.99])
    assert v.word == "within noise" and not v.decided and v.better is None
    assert v.text == "0.95× the time (within noise)"
    assert v.estimate.lo < 1 < v.estimate.hi


def test_compare_times_with_too_few_repeats_says_so():
    one = compare_times([0.59], [1.0])
    assert one.single_run and not one.decided
    assert one.text == "0.59× the time (1.7× faster, single run)"
    two = compare_times([1.2, 1.3], [1.0, 1.0])
    assert two.text == "1.2× the time (slower, only 2 repeats)" and MIN_TIMING_REPEATS == 3


def test_compare_times_accepts_measure_timing_and_rejects_bad_times():
    v = compare_times(Timing([0.5, 0.5, 0.5]), Timing([1.0, 1.0, 1.0]))
    assert v.word == "faster"
    with pytest.raises(ValueError, match="positive"):
        compare_times([0.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="empty"):
        compare_times([], [1.0])


def test_timing_summary_text_and_quartiles():
    t = timing_summary([1.18e-3, 1.10e-3, 1.31e-3, 1.20e-3, 1.15e-3])
    assert t.text == "1.18 ms (1.10–1.31 ms, n = 5)" == str(t)
    assert t.min <= t.q1 <= t.median <= t.q3 <= t.max
    assert timing_summary([2.5]).text == "2.50 s (single run)"
    assert "µs" in timing_summary([3e-6, 4e-6]).text


def test_ratio_helpers():
    assert ratio_text(0.59) == "0.59× the time (1.7× faster)"
    assert ratio_text(1.48) == "1.5× the time (slower)"
    assert ratio_text(150.0) == "150× the time (slower)"
    assert is_speedup(0.9) and not is_speedup(1.1)
    for bad in (0, -1.0, float("nan"), "fast"):
        with pytest.raises(ValueError, match="ratio"):
            ratio_text(bad)


def test_compare_times_with_many_repeats_uses_a_bootstrap_interval_of_the_median_ratio():
    # 1-09's case: 31 repeats each, 1.6x slower at the median, one slow baseline outlier and one
    # fast new repeat. The all-pairs range straddles 1 (it would say "within noise"); the
    # bootstrap interval of the ratio of medians does not.
    rng = np.random.default_rng(0)
    base = list(1.0 + rng.normal(0, 0.03, 30)) + [2.0]
    new = list(1.6 + rng.normal(0, 0.05, 30)) + [0.9]
    assert min(new) / max(base) < 1 < max(new) / min(base)
    v = compare_times(new, base)
    assert v.word == "slower" and v.decided and v.better is False
    assert 1 < v.estimate.lo < 1.6 < v.estimate.hi < 1.8 and v.estimate.n == 31
    assert BOOTSTRAP_TIMING_REPEATS == 6
    tie = compare_times(list(1.0 + rng.normal(0, 0.1, 10)), list(1.0 + rng.normal(0, 0.1, 10)))
    assert tie.word == "within noise" and tie.estimate.lo < 1 < tie.estimate.hi


def test_compare_times_bootstrap_is_reproducible_and_checks_its_arguments():
    new, base = [0.5 + 0.01 * i for i in range(8)], [1.0 + 0.01 * i for i in range(8)]
    assert compare_times(new, base).estimate == compare_times(new, base).estimate
    assert compare_times(new, base).word == "faster"
    with pytest.raises(ValueError, match="level"):
        compare_times(new, base, level=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        compare_times(new, base, n_boot=10)


def test_compare_metric_below_the_minimum_items_gives_an_undecided_direction():
    v = compare_metric([0.9, 0.8, 0.95], [0.1, 0.2, 0.15], unit="prompts")
    assert v.word == "higher" and not v.decided and v.better is True
    assert v.text == "higher by 0.73 (only n = 3 prompts, too few for an interval)"
    assert v.estimate.n == 3 and MIN_METRIC_ITEMS == 5
    low = compare_metric([0.1, 0.2, 0.1, 0.2], [0.3, 0.4, 0.3, 0.4], higher_is_better=False)
    assert low.word == "lower" and low.better is True and "n = 4 items" in low.text


def test_ratio_text_never_prints_a_ratio_other_than_one_as_one():
    assert ratio_text(1.03) == "1.03× the time (slower)"
    assert ratio_text(0.97) == "0.97× the time (1.03× faster)"
    assert ratio_text(0.59) == "0.59× the time (1.7× faster)"
    assert compare_times([1.004, 1.0, 1.01], [1.0, 1.002, 1.001]).text \
        == "1.00× the time (within noise)"
