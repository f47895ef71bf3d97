"""Interleaved timing: A B C A B C …, with warm-up, repeats and medians.

Each repeat times one batch of every contender back to back, rotating the
order, so a slow spell on the (shared) machine hits all contenders alike. A
batch records wall time (``time.perf_counter``) and this process's CPU time
(``time.process_time``: every thread of the client, memcached excluded).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.cases import Case
from bench.contenders import Contender


@dataclass
class Result:
    """One cell: a contender on a case."""

    contender: str
    calls: int  # calls per batch
    per_call: int  # units per call (1, or keys per batch call)
    wall: list[float] = field(default_factory=list)  # seconds per batch
    cpu: list[float] = field(default_factory=list)  # CPU seconds per batch

    @property
    def rates(self) -> list[float]:
        return [self.calls * self.per_call / w for w in self.wall]

    @property
    def rate(self) -> float:
        """Median units per second."""
        return statistics.median(self.rates)

    @property
    def cpu_us(self) -> float:
        """Median client CPU microseconds per unit."""
        return (
            statistics.median(c / (self.calls * self.per_call) for c in self.cpu) * 1e6
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "median_per_s": round(self.rate, 1),
            "cpu_us_per_unit": round(self.cpu_us, 3),
            "calls_per_batch": self.calls,
            "units_per_call": self.per_call,
            "per_s": [round(r, 1) for r in self.rates],
            "cpu_s": [round(c, 6) for c in self.cpu],
        }


def paired_ratio(a: Result, b: Result) -> float:
    """Median over repeats of a's rate / b's rate in the same repeat."""
    return statistics.median(x / y for x, y in zip(a.rates, b.rates, strict=True))


def paired_cpu_ratio(a: Result, b: Result) -> float:
    """Median over repeats of b's CPU time / a's in the same repeat (higher is
    better for a; the batches hold the same calls, so this is a speed ratio)."""
    return statistics.median(y / x for x, y in zip(a.cpu, b.cpu, strict=True))


def _timed(fn: Callable[[int], None], calls: int) -> float:
    t0 = time.perf_counter()
    fn(calls)
    return time.perf_counter() - t0


def calibrate(fn: Callable[[int], None], target_s: float) -> int:
    """Calls per batch so that ``fn`` takes about ``target_s`` seconds.

    Grows the count until a run takes a tenth of the target, then takes the
    fastest of three runs at that count (the least disturbed by the machine).
    """
    calls = 1
    while _timed(fn, calls) < target_s / 10 and calls < 1_000_000:
        calls *= 4
    per_call = min(_timed(fn, calls) / calls for _ in range(3))
    return max(1, int(target_s / max(per_call, 1e-9)))


def measure(
    case: Case,
    contenders: list[Contender],
    fns: dict[str, Callable[[int], None]],
    *,
    batch_s: float,
    repeats: int,
) -> dict[str, Result]:
    """Time every contender on ``case``; the slowest sets the batch size."""
    slowest = "django" if "django" in fns else contenders[0].name
    by_name = {c.name: c for c in contenders}
    with by_name[slowest].context():
        calls = calibrate(fns[slowest], batch_s)
    for c in contenders:  # warm-up: connections, caches, code paths
        with c.context():
            fns[c.name](max(1, calls // 4))
    results = {c.name: Result(c.name, calls, case.per_call) for c in contenders}
    for r in range(repeats):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            fn = fns[c.name]
            c0 = time.process_time()
            t0 = time.perf_counter()
            with c.context():  # timed too: a span exporter flushes on exit
                fn(calls)
            t1 = time.perf_counter()
            c1 = time.process_time()
            results[c.name].wall.append(t1 - t0)
            results[c.name].cpu.append(c1 - c0)
    return results
