"""The steady rate of a stage and its time left, from the parts it has finished.

A stage's first parts carry its start-up: the actors load their models, Ray schedules them, the
first batch warms the kernels up. A rate counted from the start climbs all run long (a pool's
first line said 0.29 images/s and 5.8 h left for a pool that took 9 minutes). So the rate counts
only the parts finished after the first wave (one part per actor: they start together), over a
recent window, and there is no estimate until ``actors`` parts have finished after that wave.
Parts that arrive together (Ray Data hands the driver a block of rows at once) count as one
delivery: timed apart by microseconds, they would otherwise make the rate of a burst, not of the work.
"""

from __future__ import annotations

import math
import time
from collections import deque


class SteadyRate:
    """Items per second from the parts finished after the first ``actors`` ones, over the last
    ``window_s`` seconds (at least ``actors`` parts).

    ``part(items)`` is called as each part finishes; ``rate()`` is None until there is an estimate.
    """

    BURST_S = 0.05  # parts this close to the previous one arrived with it

    def __init__(self, actors: int = 1, window_s: float = 300.0, clock=time.perf_counter):
        self.actors, self.window_s, self.clock = max(1, actors), window_s, clock
        self.seen = 0  # deliveries of parts
        self.last: float | None = None  # when the last delivery began
        self.parts: deque[tuple[float, int]] = deque()  # (finish time, items); [0] is the reference

    def part(self, items: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.last is not None and now - self.last < self.BURST_S:  # part of the same delivery
            if self.parts and self.parts[-1][0] == self.last:
                self.parts[-1] = (self.last, self.parts[-1][1] + items)
            return
        self.last = now
        self.seen += 1
        if self.seen < self.actors:  # the first wave: start-up, not the steady rate
            return
        self.parts.append((now, items))  # the wave's last part is the first reference
        while len(self.parts) > self.actors + 1 and now - self.parts[1][0] > self.window_s:
            self.parts.popleft()  # older than the window: the next part becomes the reference

    def rate(self) -> float | None:
        if len(self.parts) < self.actors + 1:
            return None
        span = self.parts[-1][0] - self.parts[0][0]
        if span <= 0:
            return None
        return sum(items for _, items in list(self.parts)[1:]) / span

    def seconds_left(self, items_left: float) -> float | None:
        rate = self.rate()
        return items_left / rate if rate else None


def duration(seconds: float | None) -> str:
    """``12 s``, ``8 min``, ``2.5 h``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def rate_text(rate: SteadyRate, items_left: float) -> str:
    """The end of a progress line: ``, 11.0 images/s, 8 min left`` once there is an estimate, else nothing."""
    steady = rate.rate()
    if steady is None:
        return ""
    return f", {steady:.2f} images/s, {duration(items_left / steady)} left"
