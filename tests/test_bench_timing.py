"""The benchmark timing helpers, on trivial callables with scripted clocks."""

from __future__ import annotations

import pytest
import torch

from memsvc.bench.timing import Timing, peak_tensor_bytes, time_median

MB = 1_000_000


class ScriptedWork:
    """A callable that advances fake wall and CPU clocks by scripted amounts per call."""

    def __init__(self, wall: list[float], cpu: list[float]) -> None:
        self.wall, self.cpu = wall, cpu
        self.now = self.cpu_now = 0.0
        self.calls = 0

    def __call__(self) -> None:
        self.now += self.wall[self.calls]
        self.cpu_now += self.cpu[self.calls]
        self.calls += 1


def test_median_of_timed_samples_excludes_warmup() -> None:
    work = ScriptedWork(wall=[100.0, 50.0, 3.0, 1.0, 2.0], cpu=[0.0, 0.0, 6.0, 2.0, 4.0])
    timing = time_median(
        work, repeats=3, warmup=2, clock=lambda: work.now, cpu_clock=lambda: work.cpu_now
    )
    assert work.calls == 5
    assert timing.samples_s == (3.0, 1.0, 2.0)
    assert timing.median_s == 2.0
    assert timing.per_second(4096) == 2048.0
    assert timing.cpu_samples_s == (6.0, 2.0, 4.0)
    assert timing.cpu_utilisation == 2.0


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    assert Timing(samples_s=(4.0, 1.0, 3.0, 2.0), cpu_samples_s=(0.0,) * 4).median_s == 2.5


def test_runs_without_grad_on_the_requested_threads_and_restores_them() -> None:
    seen: list[tuple[bool, int]] = []
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2

    def record() -> None:
        seen.append((torch.is_grad_enabled(), torch.get_num_threads()))

    time_median(record, repeats=2, warmup=1, threads=other)
    assert seen == [(False, other)] * 3
    assert torch.get_num_threads() == before
    assert torch.is_grad_enabled()


def test_rejects_no_repeats() -> None:
    with pytest.raises(ValueError):
        time_median(lambda: None, repeats=0)


def test_peak_tensor_bytes_is_the_high_water_mark_of_the_call() -> None:
    already_alive = torch.empty(50 * MB, dtype=torch.uint8)

    def work() -> torch.Tensor:
        a = torch.empty(4 * MB, dtype=torch.uint8)
        b = torch.empty(2 * MB, dtype=torch.uint8)
        del a
        c = torch.empty(8 * MB, dtype=torch.uint8)  # live now: b + c = 10 MB
        return b[:1] + c[:1]

    peak = peak_tensor_bytes(work)
    assert 10 * MB <= peak < 10 * MB + 4096
    assert already_alive.numel() == 50 * MB
