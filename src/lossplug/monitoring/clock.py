"""Training time: wall-clock time less the time spent in evaluation and in KPIs.

A rate such as ``train/tokens_per_sec`` divides the tokens of a window by the time training
took; an evaluation or a KPI that runs inside the window would otherwise show as a dip in
throughput at every evaluation step, an artefact that the report would then correlate with the
model's quality. One clock per process, shared by every monitor: an evaluation that two
callbacks both see is excluded once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class TrainingClock:
    """Seconds of training: ``time.perf_counter()`` less the intervals someone paused it for.

    Pauses may overlap (two callbacks both pausing for one evaluation): an interval is excluded
    while at least one holder pauses the clock. Every run releases the clock when it starts, so
    an evaluation that failed in an earlier run of the process never stops it for good.

    Example:
        >>> clock = TrainingClock()
        >>> start = clock.now()
        >>> with clock.paused("kpi"):
        ...     time.sleep(0.05)
        >>> clock.now() - start < 0.05
        True
    """

    def __init__(self) -> None:
        self._excluded = 0.0
        self._holders: set[object] = set()
        self._paused_at = 0.0

    def now(self) -> float:
        """Training seconds since an arbitrary origin: differences of two readings are what
        training took between them."""
        if self._holders:
            return self._paused_at - self._excluded
        return time.perf_counter() - self._excluded

    def pause(self, holder: object) -> None:
        """Stop counting until every holder has resumed (idempotent per holder)."""
        if not self._holders:
            self._paused_at = time.perf_counter()
        self._holders.add(holder)

    def resume(self, holder: object) -> None:
        """Count again once no other holder pauses (a holder that did not pause is ignored)."""
        if holder not in self._holders:
            return
        self._holders.discard(holder)
        if not self._holders:
            self._excluded += time.perf_counter() - self._paused_at

    def release_all(self) -> None:
        """Count again, whoever paused: a run starts, so no evaluation or KPI of an earlier
        one (which may have failed while it held the clock) is still going on."""
        if self._holders:
            self._holders.clear()
            self._excluded += time.perf_counter() - self._paused_at

    @contextlib.contextmanager
    def paused(self, holder: object | None = None) -> Iterator[None]:
        """The block's time is not training time."""
        holder = object() if holder is None else holder
        self.pause(holder)
        try:
            yield
        finally:
            self.resume(holder)


#: The process's training clock.
CLOCK = TrainingClock()
