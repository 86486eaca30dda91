"""``gemserve loadtest`` / ``python -m clients.loadtest``: load-test any OpenAI-compatible server.

Sends a workload (synthetic needle-in-a-haystack prompts of a chosen token length, or a JSONL
file) as streamed requests, either Poisson arrivals at ``--request-rate`` (gamma-distributed
gaps with ``--burstiness``, as vLLM's ``benchmark_serving``) or closed-loop ``--concurrency``,
and measures each request as the client sees it. ``--compare`` repeats the same workload per
compression method. GemServe-only fields (``compression``, ``metrics``) are used when present,
never required, so a plain vLLM server can be measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import logging
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from clients.config import BASE_URL_ENV, DEFAULT_BASE_URL, resolve_base_url
from clients.loadtest_report import RequestRecord, format_table, parse_slo, summarize, write_results
from evals.needles import Needle, approx_tokens, build_case, depths

if TYPE_CHECKING:
    from clients.sdk import AsyncGemServe, GemServe

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = Path("loadtest-results")
MAX_DISTINCT_PROMPTS = 256  # building a case costs ~15 /tokenize calls; longer runs reuse prompts in turn
DEPTH_COUNT = 5  # synthetic needles cycle through 5 depths, start to end of the document
DESCRIPTION = "Load-test an OpenAI-compatible server (GemServe or vLLM) and compare compression methods."
READY_POLL_S = 0.5
DEFAULT_METHOD_LABEL = "default"  # no compression field sent: the server's own default


# ---- workload ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkItem:
    """One request to send: chat ``messages`` or a completion ``prompt``, and what a right answer contains."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 32
    expected: str | None = None
    prompt_tokens: int | None = None  # as counted when the workload was built


@dataclass(frozen=True)
class MethodSpec:
    """A ``--compare`` entry: ``none``, ``gemfilter:1024`` (budget) or ``snapkv:0.25`` (ratio)."""

    label: str
    compression: dict[str, Any] | None

    @classmethod
    def parse(cls, text: str) -> MethodSpec:
        name, _, amount = text.strip().partition(":")
        if not name:
            raise ValueError(f"empty method in {text!r}; use e.g. none,gemfilter:1024,snapkv:0.25")
        if name == DEFAULT_METHOD_LABEL:
            return cls(DEFAULT_METHOD_LABEL, None)
        compression: dict[str, Any] = {"method": name}
        if amount:
            try:
                value = float(amount)
            except ValueError:
                raise ValueError(f"method {text!r}: budget must be tokens (1024) or a ratio (0.25)") from None
            if value <= 0:
                raise ValueError(f"method {text!r}: budget must be positive")
            compression["ratio" if value < 1 else "budget"] = value if value < 1 else int(value)
        return cls(text.strip(), compression)


def token_counter(client: GemServe, model: str | None, chat: bool) -> Callable[[str], int]:
    """Count a user message's tokens with the server's ``/tokenize`` (chat template included for chat),
    falling back to ~4 characters per token when the server has no such route."""
    from clients.errors import GemServeError

    def count(text: str) -> int:
        if chat:
            return client.tokenize(messages=[{"role": "user", "content": text}], model=model).count
        return client.tokenize(text, model=model).count

    try:
        count("hello")
    except GemServeError as exc:
        logger.warning("no usable /tokenize (%s); approximating 4 characters per token", exc)
        return approx_tokens
    return count


def synthetic_workload(
    count: int, input_len: int, output_len: int, seed: int, chat: bool, count_tokens: Callable[[str], int]
) -> list[WorkItem]:
    """``count`` distinct needle cases (distinct prefixes, so prefix caching cannot skew results)."""
    items = []
    for i, depth in zip(range(count), itertools.cycle(depths(DEPTH_COUNT)), strict=False):
        case = build_case(input_len, depth, seed + i, count_tokens)
        if chat:
            text = case.user_message()
            items.append(
                WorkItem(
                    messages=[{"role": "user", "content": text}],
                    max_tokens=output_len,
                    expected=case.needle.answer,
                    prompt_tokens=count_tokens(text),
                )
            )
        else:
            text = case.completion_prompt()
            items.append(
                WorkItem(
                    prompt=text, max_tokens=output_len, expected=case.needle.answer, prompt_tokens=count_tokens(text)
                )
            )
    return items


def jsonl_workload(path: Path, output_len: int) -> list[WorkItem]:
    """Lines of ``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``max_tokens`` and ``expected``."""
    if not path.is_file():
        raise FileNotFoundError(f"workload file '{path}' does not exist")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise ValueError(f"{path}:{number}: each line needs exactly one of 'messages' or 'prompt'")
        items.append(
            WorkItem(
                messages=row.get("messages"),
                prompt=row.get("prompt"),
                max_tokens=int(row.get("max_tokens", output_len)),
                expected=row.get("expected"),
            )
        )
    if not items:
        raise ValueError(f"workload file '{path}' holds no requests")
    return items


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
        "compression": method.compression,
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


# ---- CLI ---------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument(
        "--base-url",
        help=f"server root (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL}); "
        "a non-loopback host must be given here explicitly",
    )
    target.add_argument("--api-key", help="bearer token (default: $GEMSERVE_API_KEY)")
    target.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    target.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    target.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds (default 600)")
    target.add_argument("--max-retries", type=int, default=0, help="SDK retries per request (default 0: count errors)")
    work = parser.add_argument_group("workload")
    work.add_argument("--input-len", type=int, default=1024, help="synthetic prompt length in tokens (default 1024)")
    work.add_argument("--output-len", type=int, default=32, help="max_tokens per request (default 32)")
    work.add_argument("--dataset", type=Path, help="JSONL requests instead of synthetic needle prompts")
    work.add_argument("--ignore-eos", action="store_true", help="generate exactly --output-len tokens")
    work.add_argument("--temperature", type=float, default=0.0)
    work.add_argument("--method", help="one method, e.g. gemfilter:1024 (default: send none, the server decides)")
    work.add_argument("--compare", help="comma list run one after another, e.g. none,gemfilter:1024,snapkv:1024")
    load = parser.add_argument_group("load")
    load.add_argument("--num-requests", type=int, default=20, help="requests per method (default 20)")
    load.add_argument("--duration", type=float, default=600.0, help="stop sending after this many s (default 600)")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1 = Poisson)")
    load.add_argument("--concurrency", type=int, help="closed loop: at most N in flight (caps --request-rate too)")
    load.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each method (default 1)")
    load.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--slo", help="goodput targets in ms, e.g. ttft:2000,e2e:10000 (also tpot)")
    out.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, help="JSON, CSV and PNGs go here")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_target(explicit_url: str | None) -> str:
    """The base URL; a non-loopback host only when the user typed it on the command line."""
    url = resolve_base_url(explicit_url)
    host = urlsplit(url).hostname or ""
    if explicit_url is None and not _is_loopback(host):
        raise ValueError(
            f"refusing to load-test non-loopback host {host!r} from ${BASE_URL_ENV}; "
            "pass --base-url explicitly to target it"
        )
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(args: argparse.Namespace) -> list[MethodSpec]:
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.request_rate <= 0 or args.burstiness <= 0 or args.duration <= 0:
        raise ValueError("--request-rate, --burstiness and --duration must be positive")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError("--concurrency must be >= 1")
    if args.warmup < 0:
        raise ValueError("--warmup must be >= 0")
    if args.method and args.compare:
        raise ValueError("give --method or --compare, not both")
    specs = args.compare or args.method or DEFAULT_METHOD_LABEL
    methods = [MethodSpec.parse(text) for text in specs.split(",") if text.strip()]
    if len({m.label for m in methods}) != len(methods):
        raise ValueError(f"--compare lists a method twice: {specs}")
    return methods


def wait_until_ready(client: GemServe, timeout_s: float) -> None:
    """Poll ``GET /ready`` while the server loads its model; a server without the route (vLLM) is ready now."""
    from clients.errors import NotFoundError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.ready():
                return
        except NotFoundError:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client.base_url} is not ready after {timeout_s:.0f} s")
        time.sleep(READY_POLL_S)


def prepare(args: argparse.Namespace, base_url: str) -> tuple[str | None, list[WorkItem]]:
    """The model name and the workload, using the server's /v1/models and /tokenize when it has them."""
    from clients.errors import APIConnectionError, GemServeError
    from clients.sdk import GemServe

    with GemServe(base_url, args.api_key, timeout=args.timeout, max_retries=1) as client:
        try:
            client.with_options(max_retries=2).health()  # fail fast, with one clear line, if nothing listens there
        except APIConnectionError as exc:
            raise ConnectionError(f"cannot reach {base_url}: {exc}") from exc
        wait_until_ready(client, args.timeout)
        model = args.model
        if model is None:
            try:
                model = client.models().data[0].id
            except (GemServeError, IndexError):
                model = None
        if args.dataset is not None:
            return model, jsonl_workload(args.dataset, args.output_len)
        chat = args.endpoint == "chat"
        count = token_counter(client, model, chat)
        distinct = min(args.num_requests, MAX_DISTINCT_PROMPTS)
        items = synthetic_workload(distinct, args.input_len, args.output_len, args.seed, chat, count)
        return model, items


def run(args: argparse.Namespace) -> int:
    from clients.sdk import AsyncGemServe

    methods = validate(args)
    slo = parse_slo(args.slo)
    base_url = check_target(args.base_url)
    model, items = prepare(args, base_url)
    settings = RunSettings(
        model=model,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        duration_s=args.duration,
        warmup=args.warmup,
        seed=args.seed,
    )
    runs = [MethodRun(method) for method in methods]
    factory = lambda: AsyncGemServe(base_url, args.api_key, timeout=args.timeout, max_retries=args.max_retries)  # noqa: E731
    interrupted = asyncio.run(
        until_interrupted(run_all(factory, items, runs, settings, show_progress=not args.no_progress))
    )
    if interrupted:
        print("\ninterrupted: summary of the requests that finished", file=sys.stderr)
    summaries = {r.method.label: summarize(r.records, slo) for r in runs if r.records or not interrupted}
    config = {
        **{k: _jsonable(v) for k, v in vars(args).items() if not callable(v)},
        "base_url": base_url,
        "model": model,
        "api_key": None,
        "methods": [m.label for m in methods],
    }
    records = {r.method.label: r.records for r in runs}
    paths = write_results(args.output_dir, config, records, summaries, interrupted)
    print(f"target {base_url}  model {model}  {len(items)} distinct prompts, {args.num_requests} requests per method")
    print(format_table(summaries))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 130 if interrupted else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf"  # JSON has no infinity
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.loadtest", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
