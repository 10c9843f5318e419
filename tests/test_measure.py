import pytest
import torch

from utils.measure import (
    Timing,
    benchmark,
    benchmark_interleaved,
    count_parameters,
    describe_machine,
    peak_memory_bytes,
    note_worker_peak,
    process_peak_rss_bytes,
)


def test_benchmark_calls_warmup_plus_repeats_and_reports_the_median():
    calls = []
    timing = benchmark(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6
    assert len(timing.times_s) == 4
    assert timing.min_s <= timing.median_s
    assert "4 repeats" in repr(timing)


def test_benchmark_interleaved_alternates_the_order_every_round():
    order = []
    calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b"),
             "c": lambda: order.append("c")}
    timings = benchmark_interleaved(calls, rounds=3, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # one warm-up call each
    assert order[3:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert list(timings) == ["a", "b", "c"]
    assert all(len(t.times_s) == 3 for t in timings.values())


def test_benchmark_interleaved_shares_a_drift_between_sides():
    # A machine that slows down a third of the way in: timed in blocks, x would look ~4x faster.
    clock = {"calls": 0}

    def work():
        clock["calls"] += 1
        total = 0
        for i in range(2000 if clock["calls"] <= 12 else 8000):
            total += i
        return total

    timings = benchmark_interleaved({"x": work, "y": work}, rounds=18, warmup=0)
    ratio = timings["x"].median_s / timings["y"].median_s
    assert 0.5 < ratio < 2.0


def test_benchmark_interleaved_with_a_progress_bar(capsys):
    timings = benchmark_interleaved({"a": lambda: None}, rounds=2, warmup=0, progress=True)
    assert len(timings["a"].times_s) == 2


@pytest.mark.parametrize("calls, error", [({}, ValueError), ([lambda: None], ValueError),
                                          ({"a": 42}, TypeError)])
def test_benchmark_interleaved_rejects_bad_calls(calls, error):
    with pytest.raises(error, match="mapping|callable"):
        benchmark_interleaved(calls)


def test_benchmark_interleaved_rejects_bad_rounds():
    with pytest.raises(ValueError, match="rounds"):
        benchmark_interleaved({"a": lambda: None}, rounds=0)


def test_timing_median_of_known_values():
    assert Timing([3.0, 1.0, 2.0]).median_s == 2.0


@pytest.mark.parametrize("kwargs", [{"repeats": 0}, {"repeats": -3}, {"warmup": -1}, {"repeats": 2.5}])
def test_benchmark_rejects_non_positive_sizes(kwargs):
    with pytest.raises(ValueError, match="must be (a positive|an) int"):
        benchmark(lambda: None, **kwargs)


def test_benchmark_rejects_non_callables():
    with pytest.raises(TypeError, match="callable"):
        benchmark(42)


def test_peak_memory_counts_the_intermediate_tensors():
    n = 512
    a = torch.randn(n, n)

    def work():
        b = a @ a  # one n*n float32 tensor ...
        c = b + 1  # ... and a second one alive at the same time
        return c.sum()

    peak = peak_memory_bytes(work)
    assert 2 * n * n * 4 <= peak < 3 * n * n * 4


def test_peak_memory_is_zero_for_no_allocation():
    assert peak_memory_bytes(lambda: None) == 0


def test_peak_memory_rejects_other_devices():
    with pytest.raises(ValueError, match="'cpu' and 'cuda'"):
        peak_memory_bytes(lambda: None, device="meta")


def test_count_parameters_counts_shared_tensors_once_and_trainable_only():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied, as in SmolLM2
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "norm": torch.nn.LayerNorm(4)})
    assert count_parameters(model) == 40 + 8
    model["norm"].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 40


def test_count_parameters_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        count_parameters([torch.zeros(3)])


def test_machine_description_and_rss():
    text = describe_machine()
    assert "core" in text and "torch" in text
    assert process_peak_rss_bytes() > 10 * 2**20


def test_worker_peaks_add_to_the_process_peak():
    own = process_peak_rss_bytes()
    note_worker_peak(0)
    assert process_peak_rss_bytes(include_workers=True) >= own
    with pytest.raises(ValueError, match="non-negative int"):
        note_worker_peak(-1)
    with pytest.raises(ValueError, match="non-negative int"):
        note_worker_peak(True)
