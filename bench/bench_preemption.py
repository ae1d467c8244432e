"""pytest wrapper of bench.preemption: a smoke size (the fit cases, torchrun and the whole
worker), run once under ``--benchmark-disable``."""

from __future__ import annotations

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench import preemption as bench


def test_single_process_handback(benchmark: BenchmarkFixture) -> None:
    results = benchmark.pedantic(lambda: bench.bench_single(n=2, epochs=4), rounds=1)
    step, epoch = results
    assert step.name == "preemption_handback_step_single_process"
    assert step.lost_steps_max == 0  # the mid-epoch checkpoint holds every step run
    assert epoch.lost_steps_mean > 0  # the old epoch-granular handback throws an epoch away
    assert 0 < step.median_ms <= step.p99_ms


@pytest.mark.timeout(300)  # a torchrun launch on a small box
def test_torchrun_handback(benchmark: BenchmarkFixture) -> None:
    result = benchmark.pedantic(lambda: bench.bench_torchrun(n=1, epochs=3), rounds=1)
    assert result.n == 1 and result.median_ms > 0


@pytest.mark.timeout(300)  # a worker, its stores and a queued job on a small box
def test_worker_handback(benchmark: BenchmarkFixture) -> None:
    file_to_queued, seen_to_queued = benchmark.pedantic(lambda: bench.bench_worker(n=1), rounds=1)
    assert file_to_queued.name == "preemption_handback_worker_file_to_queued"
    assert seen_to_queued.name == "preemption_handback_worker_seen_to_queued"
    # the job reached QUEUED (bench_worker raises otherwise) with nothing to redo
    assert file_to_queued.lost_steps_max == 0 and seen_to_queued.lost_steps_max == 0
    assert 0 < seen_to_queued.median_ms < 10_000 and 0 < file_to_queued.median_ms < 10_000
