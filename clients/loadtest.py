"""``gemserve loadtest`` / ``python -m clients.loadtest``: load-test any OpenAI-compatible server.

Sends a workload (synthetic needle-in-a-haystack prompts of a chosen token length, or a JSONL
file: ``loadtest_workload``) as streamed requests, either Poisson arrivals at ``--request-rate``
(gamma-distributed gaps with ``--burstiness``, as vLLM's ``benchmark_serving``) or closed-loop
``--concurrency``, and measures each request as the client sees it (``loadtest_runner``).
``--compare`` repeats the same workload per compression method; ``loadtest_report`` summarises.
GemServe-only fields (``compression``, ``metrics``) are used when present, never required, so a
plain vLLM server can be measured the same way. This module is the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from clients.config import BASE_URL_ENV, DEFAULT_BASE_URL, resolve_base_url
from clients.loadtest_report import format_table, parse_slo, summarize, write_results
from clients.loadtest_runner import MethodRun, RunSettings, run_all, until_interrupted
from clients.loadtest_workload import (
    WorkItem,
    jsonl_workload,
    synthetic_workload,
    token_counter,
)
from contract.methods import DEFAULT, GRAMMAR, MethodSpec, parse_methods

if TYPE_CHECKING:
    from clients.sdk import GemServe

DEFAULT_OUTPUT_DIR = Path("loadtest-results")
MAX_DISTINCT_PROMPTS = 256  # building a case costs ~15 /tokenize calls; longer runs reuse prompts in turn
DESCRIPTION = "Load-test an OpenAI-compatible server (GemServe or vLLM) and compare compression methods."
READY_POLL_S = 0.5


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
    work.add_argument("--compare", help=f"comma list run one after another: {GRAMMAR}")
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
    return parse_methods((args.compare or args.method or DEFAULT).split(","))


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
