"""Who gets in, once for every backend: the accepting flag, the running / waiting counts, the
429 when they are full, and the drain at shutdown.

A backend admits a request in its (synchronous) ``stream()`` call, so every refusal is raised
before any response byte: :class:`EngineNotReadyError` (503) while starting or draining, the
request's own check (400), then :class:`QueueFullError` (429 + ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from server.engine.base import EngineNotReadyError, QueueFullError

logger = logging.getLogger(__name__)


class Admission:
    """``slots`` requests run at once (``slots_name`` is the setting that says so, for the 429's
    message); up to ``max_queue`` more wait."""

    def __init__(self, slots: int, slots_name: str, max_queue: int, retry_after_s: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"{slots_name} must be >= 1, got {slots}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.slots = slots
        self.slots_name = slots_name
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.accepting = False
        self.running = 0
        self.waiting = 0

    def admit(self, check: Callable[[], None]) -> Ticket:
        """Refuse (503, the check's 400, 429) or count the request as waiting."""
        if not self.accepting:
            raise EngineNotReadyError("the engine is not accepting requests (starting or shutting down)")
        check()
        limit = self.slots + self.max_queue
        if self.running + self.waiting >= limit:
            # One count: an admitted request waits until the scheduler starts it, so "waiting" may
            # exceed max_queue while slots are free; the limit is on the sum.
            raise QueueFullError(
                f"server is busy: {self.running + self.waiting} requests admitted, its limit of {limit} "
                f"({self.slots_name}={self.slots} running + max_queue={self.max_queue} queued); retry later",
                retry_after_s=self.retry_after_s,
            )
        return Ticket(self)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Stop admitting; wait for every admitted request (running or queued) to finish, at most
        ``timeout_s`` (None: as long as they take). The one drain of every backend."""
        self.accepting = False
        if self.running or self.waiting:
            logger.info("draining %d running and %d queued request(s) before shutdown", self.running, self.waiting)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (self.running or self.waiting) and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)


class AdmittedCounts:
    """The engine properties the routes and /metrics read, from the engine's :class:`Admission`."""

    admission: Admission

    @property
    def num_running(self) -> int:
        """Requests generating right now."""
        return self.admission.running

    @property
    def num_waiting(self) -> int:
        """Requests admitted but waiting for a free slot."""
        return self.admission.waiting


class Ticket:
    """One admitted request in the counts. Released exactly once: by the request's ``finally``, or
    when a stream closed before it ever started is garbage-collected."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.state = "waiting"
        admission.waiting += 1

    def start_running(self) -> None:
        if self.state == "waiting":
            self.admission.waiting -= 1
            self.admission.running += 1
            self.state = "running"

    def release(self) -> None:
        if self.state == "waiting":
            self.admission.waiting -= 1
        elif self.state == "running":
            self.admission.running -= 1
        self.state = "done"

    def __del__(self) -> None:
        self.release()
