"""The trainer's input-wait share and its bottleneck warning, with a deliberately slow loader.

The loader blocks in next() on an event that the test sets; while it is blocked the test advances the
(injected) clock by the loader's delay, and a step advances it by the step's duration. So the shares are exact,
whatever this machine's speed, and nothing waits on wall-clock time.
"""
import logging
import threading

import pytest

from moca_fast.train.input_wait import REMEDIES, WARN_INTERVALS, InputWait

STEP = 1.0
LOG_EVERY = 2


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowLoader:
    """Yields batches; each next() signals `waiting` and blocks until the test sets `released`."""

    def __init__(self, batches: int):
        self.left = batches
        self.waiting, self.released = threading.Event(), threading.Event()
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self.left == 0:
            raise StopIteration
        self.left -= 1
        self.waiting.set()
        assert self.released.wait(timeout=60), "the test never released the batch"
        self.released.clear()
        return self.left

    def close(self):
        self.closed = True


def run_steps(delays: list[float]) -> tuple[list[float], SlowLoader]:
    """A step loop in a thread over a SlowLoader whose k-th batch takes delays[k] clock units; the shares it logs
    every LOG_EVERY steps."""
    clock, loader = Clock(), SlowLoader(len(delays))
    wait = InputWait(clock)
    shares = []

    def loop():
        batches = wait.timed(loader)
        started = clock()
        for step, _ in enumerate(batches, 1):
            clock.now += STEP
            if step % LOG_EVERY == 0:
                shares.append(wait.interval_share(clock() - started, img_per_s=123.0))
                started = clock()
        batches.close()

    thread = threading.Thread(target=loop)
    thread.start()
    for delay in delays:
        assert loader.waiting.wait(timeout=60), "the step loop never asked for a batch"
        loader.waiting.clear()
        clock.now += delay
        loader.released.set()
    thread.join(timeout=60)
    assert not thread.is_alive()
    return shares, loader


def test_a_slow_loader_is_reported_once_with_the_remedies(caplog):
    intervals = WARN_INTERVALS + 2
    with caplog.at_level(logging.WARNING, logger="moca_fast.train"):
        shares, loader = run_steps([9.0] * (LOG_EVERY * intervals))
    assert shares == pytest.approx([0.9] * intervals)
    warnings = [r.getMessage() for r in caplog.records if "input pipeline is the bottleneck" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "90 %" in warnings[0] and "123 img/s" in warnings[0]
    assert all(remedy in warnings[0] for remedy in REMEDIES)
    assert loader.closed  # closing the timed batches closes the loader's iterator


def test_a_loader_that_keeps_up_logs_no_wait_and_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="moca_fast.train"):
        shares, _ = run_steps([0.0] * (LOG_EVERY * (WARN_INTERVALS + 1)))
    assert shares == [0.0] * (WARN_INTERVALS + 1)
    assert not caplog.records


def test_a_slow_start_alone_is_not_reported(caplog):
    """Workers starting at an epoch's first batch: high shares shorter than WARN_INTERVALS intervals, then none."""
    slow = [9.0] * (LOG_EVERY * (WARN_INTERVALS - 1))
    with caplog.at_level(logging.WARNING, logger="moca_fast.train"):
        shares, _ = run_steps(slow + [0.0] * LOG_EVERY + slow)
    assert shares == pytest.approx([0.9] * (WARN_INTERVALS - 1) + [0.0] + [0.9] * (WARN_INTERVALS - 1))
    assert not caplog.records
