"""The load tester's request runner: one streamed, timed request; arrivals (gamma gaps or a
closed loop of ``--concurrency``); a method's run; Ctrl-C that stops every task. Timing is the
client's view: TTFT to the first chunk with text, ITL between later ones, through the SDK's
(openai's) streaming, which yields each event as its bytes arrive."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from clients.loadtest_report import RequestRecord
from clients.loadtest_workload import WorkItem
from contract.methods import MethodSpec
from contract.needles import Needle

if TYPE_CHECKING:
    from clients.sdk import AsyncGemServe

logger = logging.getLogger("clients.loadtest")


# ---- one request -------------------------------------------------------------------------------
@dataclass
class RunSettings:
    model: str | None
    temperature: float = 0.0
    ignore_eos: bool = False
    request_rate: float = math.inf
    burstiness: float = 1.0
    concurrency: int | None = None
    num_requests: int = 20
    duration_s: float = 600.0
    warmup: int = 1
    seed: int = 0


async def send_one(
    client: AsyncGemServe, item: WorkItem, method: MethodSpec, settings: RunSettings, index: int, run_start: float
) -> RequestRecord:
    """Stream one request and time it: TTFT to the first non-empty chunk, ITL between later ones."""
    from clients.errors import GemServeError

    record = RequestRecord(
        method=method.label,
        index=index,
        start_s=time.perf_counter() - run_start,
        expected=item.expected,
        prompt_tokens=item.prompt_tokens,
    )
    common: dict[str, Any] = {
        "model": settings.model,
        "max_tokens": item.max_tokens,
        "stream": True,
        "temperature": settings.temperature,
        "compression": method.compression(),
        "ignore_eos": settings.ignore_eos or None,
    }
    sent = time.perf_counter()
    last, chunks = sent, 0
    try:
        if item.messages is not None:
            stream = await client.chat.completions.create(messages=item.messages, **common)
        else:
            stream = await client.completions.create(prompt=item.prompt or "", **common)
        record.request_id = stream.request_id
        async with stream:
            async for _chunk in stream:
                now = time.perf_counter()
                if len(stream.text) == len(record.output_text):
                    continue  # a role-only or usage-only chunk: no new text, not a token
                record.output_text = stream.text
                chunks += 1
                if record.ttft_ms is None:
                    record.ttft_ms = (now - sent) * 1000
                else:
                    record.itl_ms.append((now - last) * 1000)
                last = now
        record.e2e_ms = (time.perf_counter() - sent) * 1000
        record.ok = True
        record.output_tokens = stream.usage.completion_tokens if stream.usage else chunks
        if stream.usage and stream.usage.prompt_tokens:
            record.prompt_tokens = stream.usage.prompt_tokens
        record.kept_tokens = stream.compression.kept_tokens if stream.compression else None
        record.server_metrics = stream.metrics.model_dump(exclude_unset=True) if stream.metrics else None
        record.correct = _found(item.expected, record.output_text)
    except (GemServeError, ValueError) as exc:
        record.error_type = type(exc).__name__
        record.error_message = str(exc)[:500]
    return record


def _found(expected: str | None, text: str) -> bool | None:
    if expected is None:
        return None
    # The needle's own comparison (digits without separators, words without case), also for JSONL answers.
    return Needle("", "", expected).found_in(text)


# ---- arrivals ----------------------------------------------------------------------------------
def inter_arrival_s(rng: random.Random, rate: float, burstiness: float) -> float:
    """Gamma-distributed gap with mean ``1/rate``; burstiness 1 = Poisson, < 1 burstier, > 1 steadier."""
    if math.isinf(rate):
        return 0.0
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


@dataclass
class MethodRun:
    """The records of one method's run, filled as requests finish (so Ctrl-C keeps them)."""

    method: MethodSpec
    records: list[RequestRecord] = field(default_factory=list)


async def run_method(
    client: AsyncGemServe, items: Sequence[WorkItem], run: MethodRun, settings: RunSettings, progress: Any
) -> None:
    """Warm up, then send requests until ``num_requests`` are sent or ``duration_s`` has passed."""
    for i in range(settings.warmup):
        await send_one(client, items[i % len(items)], run.method, settings, -1 - i, time.perf_counter())
    rng = random.Random(settings.seed)
    start = time.perf_counter()
    limit = asyncio.Semaphore(settings.concurrency) if settings.concurrency else None
    tasks: list[asyncio.Task[None]] = []

    async def one(index: int) -> None:
        try:
            record = await send_one(client, items[index % len(items)], run.method, settings, index, start)
        finally:
            if limit is not None:
                limit.release()
        run.records.append(record)
        progress.update(1)

    try:
        for index in range(settings.num_requests):
            if limit is not None:
                await limit.acquire()  # at most --concurrency in flight: the next waits for a free slot
            if time.perf_counter() - start >= settings.duration_s:
                logger.info("%s: --duration reached after %d requests", run.method.label, index)
                break
            tasks.append(asyncio.create_task(one(index)))
            await asyncio.sleep(inter_arrival_s(rng, settings.request_rate, settings.burstiness))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def run_all(
    client_factory: Callable[[], AsyncGemServe],
    items: Sequence[WorkItem],
    runs: Sequence[MethodRun],
    settings: RunSettings,
    show_progress: bool = True,
) -> None:
    from tqdm import tqdm

    async with client_factory() as client:
        for run in runs:
            with tqdm(total=settings.num_requests, desc=run.method.label, disable=not show_progress) as progress:
                await run_method(client, items, run, settings, progress)


async def until_interrupted(work: Any) -> bool:
    """Run ``work``; Ctrl-C (SIGINT) stops it and this returns True.

    asyncio.run's own SIGINT handling only cancels the main task, and a run whose main task
    outlived that cancellation went on to send every request and exit 0 (seen in
    tests/test_loadtest.py). Here SIGINT cancels every task, the requests in flight too.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    interrupted = False

    def on_sigint() -> None:
        nonlocal interrupted
        interrupted = True
        for other in asyncio.all_tasks(loop):
            if other is not asyncio.current_task(loop):
                other.cancel()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return interrupted
