"""Measurement helpers: median timings, peak memory, parameter counts, the machine's name.

Timings are reported as the median of repeats and never asserted: a chapter prints them in
a table (usually as a ratio measured in one run), where the reader sees them.

To *compare* ways of doing one thing, time them with :func:`benchmark_interleaved`, not with one
:func:`benchmark` block after another. On a shared machine the load drifts over seconds; timed in
blocks, a drift lands on one side only and can flip a verdict (chapter 1-09 read "1.4x slower" on
one run and "1.4x faster" on the next). Interleaved, round ``r`` calls every function once, in the
listed order on even rounds and reversed on odd ones, so a drift (and any favour to going first)
hits every side alike; :func:`utils.stats.compare_times` then treats the repeats as exchangeable.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Mapping, TypeVar

import torch

from utils.checks import check_positive_int


__all__ = [
    "Timing",
    "benchmark",
    "benchmark_interleaved",
    "note_worker_peak",
    "peak_memory_bytes",
    "process_peak_rss_bytes",
    "count_parameters",
    "describe_machine",
]


def _synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock times of repeated calls, in seconds."""

    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    def __repr__(self) -> str:
        return f"Timing(median={self.median_s * 1e3:.3f} ms over {len(self.times_s)} repeats)"


def benchmark(
    fn: Callable[[], object],
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed.

    On CUDA, pass ``device`` so the GPU is synchronised before each clock read.
    Use :attr:`Timing.median_s`: the median shrugs off a stray slow repeat.
    """
    check_positive_int("repeats", repeats)
    check_positive_int("warmup", warmup, minimum=0)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times)


_Key = TypeVar("_Key", bound=Hashable)


def benchmark_interleaved(
    calls: Mapping[_Key, Callable[[], object]],
    *,
    rounds: int = 15,
    warmup: int = 1,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[_Key, Timing]:
    """Time several ways of doing one thing in alternating rounds: ``{key: Timing}``.

    Every function is first called ``warmup`` times untimed; then each of ``rounds`` rounds
    times one call of every function, in the order of ``calls`` on even rounds and in reverse
    on odd rounds (A B C, C B A, ...). A change of load during the measurement therefore
    reaches every side alike, which timing one block after another cannot promise (module
    docstring). Use 6 or more rounds when the timings go to :func:`utils.stats.compare_times`:
    from 6 repeats it decides by a bootstrap interval of the ratio of medians.
    """
    check_positive_int("rounds", rounds)
    check_positive_int("warmup", warmup, minimum=0)
    if not isinstance(calls, Mapping) or len(calls) == 0:
        raise ValueError("calls must be a non-empty mapping {name: function}, e.g. "
                         "{'ours': lambda: f(x), 'library': lambda: g(x)}")
    for key, fn in calls.items():
        if not callable(fn):
            raise TypeError(f"calls[{key!r}] must be callable, got {type(fn).__name__}")
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    keys = list(calls)
    times: dict[_Key, list[float]] = {key: [] for key in keys}
    round_iter: Iterator[int] | range = range(rounds)
    if progress:
        from utils.book import progress as _progress_bar  # book imports measure: import late

        round_iter = iter(_progress_bar(range(rounds), desc="timing rounds"))
    for r in round_iter:
        for key in keys if r % 2 == 0 else reversed(keys):
            _synchronize(device)
            start = time.perf_counter()
            calls[key]()
            _synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: Timing(times[key]) for key in keys}


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C-level stderr (the profiler prints start/stop lines there)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensor memory allocated *while* ``fn()`` runs (above what was live before).

    - CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak.
    - CPU: torch's profiler records every tensor allocation and free with the running total;
      we take the highest total it reached. This counts tensors only (not Python objects),
      and it is exact and repeatable, unlike sampling the process's resident memory.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - before)
    if dev.type != "cpu":
        raise ValueError(f"peak_memory_bytes supports 'cpu' and 'cuda', got {device!r}")
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), warnings.catch_warnings():
        # Some torch releases warn "Profiler clears events at the end of each cycle" here: harmless
        # for one cycle, and not the reader's concern.
        warnings.filterwarnings("ignore", message=".*Profiler clears events", category=UserWarning)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        with _quiet_stderr():
            prof.export_chrome_trace(trace)
        with open(trace) as fh:
            events = json.load(fh)["traceEvents"]
    totals = [
        (e["args"]["Total Allocated"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0
    ]
    if not totals:
        return 0
    first_total, first_bytes = totals[0]
    baseline = first_total - first_bytes
    return max(0, max(total for total, _ in totals) - baseline)


_WORKER_PEAK_BYTES = 0


def note_worker_peak(total_bytes: int) -> None:
    """Record the summed peak resident memory of one group of worker processes.

    :func:`utils.distributed.launch` calls it after every run; the largest group counts.
    """
    global _WORKER_PEAK_BYTES
    if isinstance(total_bytes, bool) or not isinstance(total_bytes, int) or total_bytes < 0:
        raise ValueError(f"total_bytes must be a non-negative int, got {total_bytes!r}")
    _WORKER_PEAK_BYTES = max(_WORKER_PEAK_BYTES, total_bytes)


def process_peak_rss_bytes(include_workers: bool = False) -> int:
    """The highest resident memory this process has used so far (Linux/macOS).

    With ``include_workers``, add the largest summed peak of the worker processes this process
    launched (:func:`note_worker_peak`): an upper bound on the memory the machine needed at once,
    since the peaks need not coincide.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if platform.system() == "Darwin" else peak * 1024
    return peak + (_WORKER_PEAK_BYTES if include_workers else 0)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors, such as tied embeddings, counted once)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in params.values())


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> str:
    """One line naming the machine a measurement ran on (CPU, cores, memory, GPU, torch)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem = f", {mem_gib:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem = ""
    gpu = f", GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cores}-core {_cpu_model_name()}{mem}{gpu}; torch {torch.__version__}, Python {platform.python_version()}"
