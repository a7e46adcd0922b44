"""How long the step loop waits for its batches: the input pipeline as the bottleneck.

Each next(batch) is timed; at every metrics record the trainer logs `input_wait`, the share of the interval's
wall time this rank spent waiting for batches, beside img_per_s. While the share stays above WARN_SHARE for
WARN_INTERVALS records in a row, the loader, not the device, sets the speed: the run warns once, naming the
remedies. The first batches of an epoch wait for the workers to start; a single high interval is not reported.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterator

log = logging.getLogger("moca_fast.train")

WARN_SHARE = 0.1
WARN_INTERVALS = 3
REMEDIES = ("more loader workers (num_workers, at most the node's cores over its ranks)",
            "the colour operations on the GPU (photometric_on=device, the default there on the torch backend)",
            "GPU decoding (data_backend=dali)", "the data on a local disk or in the page cache")


class TimedBatches:
    """An iterator of batches whose time spent in next() accumulates in `wait.waited`; close() closes the source."""

    def __init__(self, batches: Iterator, wait: "InputWait"):
        self.batches, self.wait = batches, wait

    def __iter__(self):
        return self

    def __next__(self):
        started = self.wait.clock()
        try:
            return next(self.batches)
        finally:
            self.wait.waited += self.wait.clock() - started

    def close(self) -> None:
        if hasattr(self.batches, "close"):
            self.batches.close()


class InputWait:
    """Time waited for batches since the last interval, and the warning when it stays a large share."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.waited = 0.0
        self.high_intervals = 0
        self.warned = False

    def timed(self, batches: Iterator) -> TimedBatches:
        return TimedBatches(batches, self)

    def interval_share(self, seconds: float, img_per_s: float) -> float:
        """The share of an interval of `seconds` spent waiting (reset for the next one); warns when it stays high."""
        share = min(self.waited / seconds, 1.0) if seconds > 0 else 0.0
        self.waited = 0.0
        self.high_intervals = self.high_intervals + 1 if share > WARN_SHARE else 0
        if self.high_intervals >= WARN_INTERVALS and not self.warned:
            self.warned = True
            log.warning("the input pipeline is the bottleneck: the steps waited for their batches %.0f %% of the "
                        "time over the last %d log intervals (%.4g img/s); remedies: %s", 100 * share,
                        self.high_intervals, img_per_s, "; ".join(REMEDIES))
        return share
