"""``--step-trace FILE``: one JSON line per engine step of the hf backend, written as it runs.

What a step ran and how long it took, in the serving process itself: the figures a benchmark
needs to bound a load's throughput by this process's own step costs (``bench/batching.py``:
this VM runs some processes ~15-20% slower than others for their whole life, so a bound from
step costs measured in another process was off by that much), and what an operator needs to
see how the scheduler cut a load into steps. Written here because the metrics that serving
engines export (vLLM's iteration-token histograms, SGLang's per-interval batch logs) aggregate
steps, and the bound needs each step's own time and shape.

A line: ``{"time": unix seconds at the step's start, "seconds": its wall time, "decodes": decode
tokens, "prefill": [[start, tokens], ...], "filter": [[start, tokens], ...], "preempted": n}``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TextIO

from server.engine.scheduler import StepPlan


class StepTrace:
    """Appends a line per non-empty step to ``path`` (line-buffered: a crash loses at most a line)."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()

    def record(self, plan: StepPlan, started: float, seconds: float) -> None:
        if plan.empty:
            return
        line = {
            "time": round(started, 6),
            "seconds": round(seconds, 6),
            "decodes": len(plan.decodes),
            "prefill": [[chunk.start, chunk.tokens] for chunk in plan.prefills],
            "filter": [[chunk.start, chunk.tokens] for chunk in plan.filters],
            "preempted": len(plan.preempted),
        }
        with self._lock:
            if not self._file.closed:
                self._file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()
