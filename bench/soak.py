"""Soak test (issues 12, 24): the real server under hours of mixed traffic, checked for errors and leaks.

Starts ``gemserve serve`` as a subprocess on 127.0.0.1 (a free port, ``--max-queue 8``, a random API
key passed in ``GEMSERVE_API_KEY``, never on the command line), waits for ``GET /ready``, then runs
``--clients`` concurrent asyncio clients for ``--minutes``. Each client loops over a random (seeded) mix:

- completions and chat completions, streamed and not, prompts of ~300-3000 tokens of varied prose,
  4-32 new tokens, greedy or temperature 0.7 with a seed, over every compression method and two
  sparse attention backends;
- deliberate disconnects: a stream closed after its first 1-2 events, and a request abandoned by a
  0.3 s client timeout;
- bad inputs that must be answered with a 4xx ``{"error": {...}}``: unknown method, knob or attention
  backend, temperature -1, max_tokens 0, empty messages, malformed JSON, missing or wrong API key, a
  prompt one token over the context, a body over the size limit;
- ``GET /health``, ``GET /metrics``, ``POST /tokenize``.

Every answer is classified. Expected: ``ok``, ``expected_4xx``, ``429`` (queue full: normal under
load, the client sleeps Retry-After) and ``disconnect`` (ours). Unexpected: ``5xx``,
``unexpected_status`` (a good request refused, a bad one accepted), ``stream_error`` (an in-band
error event, no ``[DONE]``, no finish_reason), ``transport_error``, ``timeout`` (over
``--request-timeout``) and ``client_bug`` (an exception in this script). Every ``--sample-s``
seconds it records the server's RSS, threads and open fds (from /proc) and its
``gemserve_requests_running`` / ``gemserve_requests_waiting`` gauges.

Passed = no unexpected outcome, RSS slope after the warm-up within ``--rss-slope-limit`` MiB per
10 minutes (least squares; 20 by default, 2 in ``make soak``, whose warm-up is the first of its two
hours), thread count varying by at most 2 after the warm-up, the server alive throughout and the
run not interrupted. Writes bench/results/soak_<model>.json (also after every sample, so a crash
leaves data), a PNG next to it and a section of docs/benchmarks.md; prints one line; exits 0 if
passed, 1 otherwise. Ctrl-C stops the load early (the results are written, the run fails); a
second Ctrl-C aborts. The server is always stopped: SIGINT, then SIGTERM, then SIGKILL.

Not part of ``make test``; ``make test-slow`` runs two minutes of it as a system test
(tests/test_soak.py: no unexpected outcome, the server stopped gracefully). By hand:

    make soak                                  # 2 hours, the default model; the verdict fits the last hour
    make soak SOAK_MINUTES=30 SOAK_WARMUP=5     # the issue-12 run
    python -m bench.soak --minutes 30
    python -m bench.soak --minutes 1 --no-doc  # a quick check of the script itself
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from bench.common import RESULTS_DIR, figure, machine_description, model_slug, replace_doc_section, write_json
from bench.harness import (
    HOST,
    checkout_environment,
    free_port,
    log_tail,
    metric_sums,
    open_fds,
    process_status,
    serve_command,
    start_server,
    stop_server,
    wait_until_ready,
)
from contract.needles import filler_sentences

logger = logging.getLogger("bench.soak")

MIB = 2**20

COMPRESSIONS: tuple[dict[str, Any], ...] = (
    {"method": "none"},
    {"method": "gemfilter", "budget": 256},
    {"method": "snapkv", "budget": 256},
    {"method": "h2o", "budget": 256},
    {"method": "streamingllm", "budget": 256},
    {"method": "pyramidkv", "budget": 256},
    {"method": "none", "attention": "block_sparse"},
    {"method": "gemfilter", "budget": 256, "filter_attention": "streaming"},
)
PROMPT_TOKENS = (300, 800, 1500, 3000)
# How often each client picks each kind of request (relative weights).
REQUEST_WEIGHTS = {"generate": 60, "stream_disconnect": 7, "abandon": 5, "bad_input": 16, "cheap_route": 12}

EXPECTED_KINDS = ("ok", "expected_4xx", "429", "disconnect")
UNEXPECTED_KINDS = ("5xx", "unexpected_status", "stream_error", "transport_error", "timeout", "client_bug")
SAMPLE_MESSAGES_PER_KIND = 5
RSS_SLOPE_LIMIT_MB_PER_10MIN = 20.0  # the default; `make soak` asks for +-2 over its last hour (issue 24)
THREAD_SPREAD_LIMIT = 2
MAX_RETRY_AFTER_S = 30.0


# ---- outcomes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""
    retry_after_s: float = 0.0


class Attempt(NamedTuple):
    request: str  # a label such as "chat stream" or "bad: max_tokens 0"
    outcome: Outcome
    compression: str | None = None


@dataclass
class Tally:
    """Outcome counts, by kind, by request label and by compression, plus a few messages per unexpected kind."""

    totals: Counter[str] = field(default_factory=Counter)
    by_request: dict[str, Counter[str]] = field(default_factory=dict)
    by_compression: dict[str, Counter[str]] = field(default_factory=dict)
    messages: dict[str, list[str]] = field(default_factory=dict)

    def record(self, attempt: Attempt) -> None:
        kind = attempt.outcome.kind
        self.totals[kind] += 1
        self.by_request.setdefault(attempt.request, Counter())[kind] += 1
        if attempt.compression:
            self.by_compression.setdefault(attempt.compression, Counter())[kind] += 1
        if kind in UNEXPECTED_KINDS:
            message = f"{attempt.request}: {attempt.outcome.detail}"[:500]
            logger.warning("%s: %s", kind, message)
            kept = self.messages.setdefault(kind, [])
            if len(kept) < SAMPLE_MESSAGES_PER_KIND:
                kept.append(message)

    @property
    def completed(self) -> int:
        return sum(self.totals.values())

    @property
    def unexpected(self) -> int:
        return sum(self.totals[kind] for kind in UNEXPECTED_KINDS)


@dataclass(frozen=True)
class BadInput:
    label: str
    path: str
    expected: tuple[int, ...]
    body: dict[str, Any] | None = None
    raw: bytes | None = None  # sent as is, with Content-Type: application/json
    auth: str = "key"  # "key", "none" or "wrong"


@dataclass
class SoakRun:
    """What the clients and the sampler share."""

    args: argparse.Namespace
    url: str
    key: str
    proc: subprocess.Popen[bytes]
    prompt_targets: list[int]
    bad_inputs: list[BadInput]
    result: dict[str, Any]
    out_path: Path
    tally: Tally = field(default_factory=Tally)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # clear while an idle probe drains the server
    in_flight: int = 0
    load_start: float = 0.0
    deadline: float = 0.0
    interrupted: bool = False
    server_died: bool = False


# ---- the server process (bench/harness.py runs it) ---------------------------------------------
def server_facts(url: str, key: str) -> tuple[str, int, int]:
    """The served model's name, its context length, and one valid token id (for the over-length prompt)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        models = client.get("/v1/models")
        models.raise_for_status()
        tokenized = client.post("/tokenize", json={"prompt": "Hello there"})
        tokenized.raise_for_status()
    facts = tokenized.json()
    return models.json()["data"][0]["id"], int(facts["max_model_len"]), int(facts["tokens"][0])


async def scrape_gauges(client: httpx.AsyncClient) -> dict[str, float | None]:
    names = ("gemserve_requests_running", "gemserve_requests_waiting")
    try:
        response = await client.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return dict.fromkeys(names)
    return metric_sums(response.text, names) if response.status_code == 200 else dict.fromkeys(names)


async def take_sample(run: SoakRun, client: httpx.AsyncClient) -> dict[str, Any]:
    gauges = await scrape_gauges(client)
    return {
        "t_s": round(time.monotonic() - run.load_start, 1),
        **process_status(run.proc.pid),
        "open_fds": open_fds(run.proc.pid),
        "completed": run.tally.completed,
        "outcomes": dict(run.tally.totals),
        "requests_running": gauges["gemserve_requests_running"],
        "requests_waiting": gauges["gemserve_requests_waiting"],
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def log_sample(sample: dict[str, Any], unexpected: int) -> None:
    rss = sample["rss_bytes"]
    logger.info(
        "t=%.1f min  rss=%s MiB  threads=%s  fds=%s  completed=%d  unexpected=%d  running=%s  waiting=%s",
        sample["t_s"] / 60,
        "-" if rss is None else f"{rss / MIB:.0f}",
        sample["threads"],
        sample["open_fds"],
        sample["completed"],
        unexpected,
        sample["requests_running"],
        sample["requests_waiting"],
    )


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` unless ``stop`` is set first; True when it was."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    return stop.is_set()


async def sampler(run: SoakRun) -> None:
    """Every --sample-s: a sample, a log line, the JSON rewritten; stops the load if the server died."""
    async with make_client(run) as client:
        while True:
            sample = await take_sample(run, client)
            run.result["samples"].append(sample)
            run.result["totals"] = dict(run.tally.totals)
            log_sample(sample, run.tally.unexpected)
            write_json(run.out_path, run.result)  # a crash of this script still leaves the data so far
            if run.proc.poll() is not None:
                logger.error("the server exited with %s during the run", run.proc.returncode)
                run.server_died = True
                run.stop.set()
                return
            if await wait_or_stop(run.stop, run.args.sample_s):
                return


async def server_idle(run: SoakRun, client: httpx.AsyncClient) -> bool:
    if run.in_flight:
        return False
    gauges = await scrape_gauges(client)  # abandoned requests may still be finishing inside the server
    return gauges["gemserve_requests_running"] == 0 and gauges["gemserve_requests_waiting"] == 0


async def idle_probe(run: SoakRun, client: httpx.AsyncClient) -> dict[str, Any] | None:
    """Hold the clients back, wait until the server has nothing running, read its RSS, let them go.

    The RSS under load swings by hundreds of MiB with the prompts in flight (the allocator returns
    large blocks when they are freed), which buries a leak of a few MiB an hour in noise; what the
    server holds between requests does not swing, so its trend is the leak measure."""
    run.gate.clear()
    began = time.monotonic()
    try:
        while not await server_idle(run, client):
            if run.stop.is_set() or time.monotonic() - began > run.args.request_timeout + 30:
                return None
            await asyncio.sleep(0.25)
        await asyncio.sleep(1.0)  # the last response's buffers are released after it is sent
        return {
            "t_s": round(time.monotonic() - run.load_start, 1),
            "drain_s": round(time.monotonic() - began, 1),
            **process_status(run.proc.pid),
        }
    finally:
        run.gate.set()


async def idle_prober(run: SoakRun) -> None:
    """Every --idle-probe-min: an idle probe, logged and kept in result["idle_samples"]."""
    async with make_client(run) as client:
        while not await wait_or_stop(run.stop, run.args.idle_probe_min * 60):
            if time.monotonic() >= run.deadline:
                return
            probe = await idle_probe(run, client)
            if probe is not None and probe["rss_bytes"] is not None:
                run.result["idle_samples"].append(probe)
                logger.info(
                    "idle probe t=%.1f min: rss=%.1f MiB (drained in %.1f s)",
                    probe["t_s"] / 60,
                    probe["rss_bytes"] / MIB,
                    probe["drain_s"],
                )


# ---- request bodies ---------------------------------------------------------------------------
def compression_label(compression: dict[str, Any]) -> str:
    label = compression["method"] + (f"-{compression['budget']}" if "budget" in compression else "")
    for knob in ("attention", "filter_attention"):
        if knob in compression:
            label += f" {knob}={compression[knob]}"
    return label


def filler_text(rng: random.Random, target_tokens: int) -> str:
    """Varied prose of about ``target_tokens`` tokens (a filler sentence is ~20 tokens)."""
    return " ".join(filler_sentences(rng, max(1, target_tokens // 20)))


EDGE_SAMPLING = ({"temperature": 1e-300}, {"temperature": 1e-40}, {"temperature": 0.7, "top_p": 5e-324})


def generation_body(
    rng: random.Random, *, chat: bool, stream: bool, compression: dict[str, Any], target_tokens: int, max_tokens: int
) -> dict[str, Any]:
    text = filler_text(rng, target_tokens)
    body: dict[str, Any] = {"max_tokens": max_tokens, "stream": stream, "compression": compression}
    roll = rng.random()
    if roll < 0.45:
        body["temperature"] = 0
    elif roll < 0.9:
        body.update(temperature=0.7, seed=rng.randrange(2**31))
    else:  # values the schema allows at its edges (issue 12: these were 500s)
        body.update(rng.choice(EDGE_SAMPLING), seed=rng.randrange(2**63))
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}  # one more chunk, with choices: []
    if chat:
        body["messages"] = [{"role": "user", "content": f"{text}\n\nSummarise the text above in one sentence."}]
    else:
        body["prompt"] = f"{text}\n\nIn short, the text above is about"
    return body


def bad_inputs(max_model_len: int, token_id: int) -> list[BadInput]:
    """Requests the server must refuse with a 4xx and an OpenAI error body."""
    prompt = "Say hello."
    messages = [{"role": "user", "content": prompt}]
    completion = {"prompt": prompt, "max_tokens": 4}
    # Over the body limit (server/guards.py: 64 bytes per context token, at least 1 MiB).
    huge_text = "word " * (max(2 * MIB, 128 * max_model_len) // 5)
    return [
        BadInput("bad: unknown method", "/v1/completions", (400,), {**completion, "compression": {"method": "nope"}}),
        BadInput(
            "bad: unknown knob",
            "/v1/chat/completions",
            (400,),
            {"messages": messages, "max_tokens": 4, "compression": {"method": "snapkv", "budget": 256, "nope": 1}},
        ),
        BadInput(
            "bad: unknown attention backend",
            "/v1/completions",
            (400,),
            {**completion, "compression": {"method": "none", "attention": "nope"}},
        ),
        BadInput("bad: temperature -1", "/v1/chat/completions", (400,), {"messages": messages, "temperature": -1}),
        BadInput("bad: max_tokens 0", "/v1/completions", (400,), {"prompt": prompt, "max_tokens": 0}),
        BadInput("bad: max_tokens true", "/v1/completions", (400,), {"prompt": prompt, "max_tokens": True}),
        BadInput("bad: seed 1.5", "/v1/completions", (400,), {**completion, "temperature": 0.5, "seed": 1.5}),
        BadInput(
            "bad: kernel_size 2**61+1",
            "/v1/completions",
            (400,),
            {**completion, "compression": {"method": "snapkv", "kernel_size": 2**61 + 1}},
        ),
        BadInput(
            "bad: tools",
            "/v1/chat/completions",
            (400,),
            {"messages": messages, "tools": [{"type": "function", "function": {"name": "f"}}]},
        ),
        BadInput("bad: empty messages", "/v1/chat/completions", (400,), {"messages": [], "max_tokens": 4}),
        BadInput("bad: malformed JSON", "/v1/chat/completions", (400,), raw=b'{"messages": [{"role": "user", "con'),
        BadInput("bad: missing API key", "/v1/completions", (401,), completion, auth="none"),
        BadInput("bad: wrong API key", "/v1/completions", (401,), completion, auth="wrong"),
        BadInput(
            "bad: prompt over the context",
            "/v1/completions",
            (400, 413),
            {"prompt": [token_id] * (max_model_len + 1), "max_tokens": 4},
        ),
        BadInput("bad: body over the size limit", "/v1/completions", (400, 413), {**completion, "prompt": huge_text}),
    ]


# ---- classifying answers ----------------------------------------------------------------------
def request_id(response: httpx.Response) -> str:
    return response.headers.get("x-request-id", "-")


def snippet(response: httpx.Response, limit: int = 200) -> str:
    try:
        return " ".join(response.text.split())[:limit]
    except (httpx.ResponseNotRead, ValueError):
        return ""


def retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def failure_of_good_request(response: httpx.Response) -> Outcome | None:
    """None when a request that should succeed got 200; otherwise what it got instead."""
    status = response.status_code
    if status == 200:
        return None
    if status == 429:
        return Outcome("429", snippet(response), retry_after_s=retry_after(response))
    kind = "5xx" if status >= 500 else "unexpected_status"
    return Outcome(kind, f"HTTP {status} (request id {request_id(response)}): {snippet(response)}")


def has_error_body(response: httpx.Response) -> bool:
    try:
        payload = response.json()
    except ValueError:
        return False
    return isinstance(payload, dict) and isinstance(payload.get("error"), dict) and "message" in payload["error"]


def classify_bad_answer(response: httpx.Response, expected: tuple[int, ...]) -> Outcome:
    status = response.status_code
    if status == 429:
        return Outcome("429", snippet(response), retry_after_s=retry_after(response))
    if status >= 500:
        return Outcome("5xx", f"HTTP {status} (request id {request_id(response)}): {snippet(response)}")
    if status in expected and has_error_body(response):
        return Outcome("expected_4xx")
    wanted = "/".join(str(s) for s in expected)
    return Outcome(
        "unexpected_status",
        f"expected HTTP {wanted} with an error body, got {status} (request id {request_id(response)}): "
        f"{snippet(response)}",
    )


def transport_outcome(exc: httpx.TransportError) -> Outcome:
    return Outcome("transport_error", f"{type(exc).__name__}: {exc}")


async def send(client: httpx.AsyncClient, request: httpx.Request, timeout_s: float) -> httpx.Response | Outcome:
    """Send and read the whole answer within ``timeout_s``; a timeout or transport failure becomes its Outcome."""
    try:
        async with asyncio.timeout(timeout_s):
            return await client.send(request)
    except (TimeoutError, httpx.TimeoutException):
        return Outcome("timeout", f"no answer within {timeout_s:g} s")
    except httpx.TransportError as exc:
        return transport_outcome(exc)


@dataclass
class StreamReading:
    events: int = 0
    done: bool = False  # saw data: [DONE]
    finished: bool = False  # saw a choice with a finish_reason
    error: str | None = None


def read_event(data: str, reading: StreamReading) -> None:
    reading.events += 1
    try:
        event = json.loads(data)
    except ValueError:
        reading.error = reading.error or f"undecodable event {data[:100]!r}"
        return
    if not isinstance(event, dict):
        reading.error = reading.error or f"event is not an object: {data[:100]!r}"
    elif "error" in event:
        reading.error = reading.error or json.dumps(event["error"])[:300]
    elif any(isinstance(c, dict) and c.get("finish_reason") for c in event.get("choices") or []):
        reading.finished = True


def stream_outcome(reading: StreamReading, rid: str) -> Outcome:
    where = f"after {reading.events} events (request id {rid})"
    if reading.error:
        return Outcome("stream_error", f"in-band error {where}: {reading.error}")
    if not reading.done:
        return Outcome("stream_error", f"stream ended without [DONE] {where}")
    if not reading.finished:
        return Outcome("stream_error", f"no chunk with a finish_reason before [DONE] {where}")
    return Outcome("ok")


async def streamed_generation(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], timeout_s: float, close_after: int | None = None
) -> Outcome:
    """POST a streamed request and read its SSE events to ``[DONE]``, or close after ``close_after`` events."""
    reading = StreamReading()
    rid = "-"
    closed_early = False
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", path, json=body) as response:
            rid = request_id(response)
            if response.status_code != 200:
                await response.aread()
                return failure_of_good_request(response) or Outcome("unexpected_status", "not 200")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    reading.done = True
                    break
                read_event(data, reading)
                if close_after is not None and reading.events >= close_after:
                    # Leaving `async with` on an unread body closes the connection: the server sees us go.
                    closed_early = True
                    break
    except (TimeoutError, httpx.TimeoutException):
        return Outcome("timeout", f"stream not finished within {timeout_s:g} s after {reading.events} events")
    except httpx.TransportError as exc:
        return transport_outcome(exc)
    if closed_early and not reading.error:
        return Outcome("disconnect", f"closed after {reading.events} events")
    return stream_outcome(reading, rid)


async def non_streamed_generation(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], timeout_s: float
) -> Outcome:
    answer = await send(client, client.build_request("POST", path, json=body), timeout_s)
    if isinstance(answer, Outcome):
        return answer
    failure = failure_of_good_request(answer)
    if failure is not None:
        return failure
    try:
        payload = answer.json()
    except ValueError:
        return Outcome("unexpected_status", f"HTTP 200 with a body that is not JSON: {snippet(answer)}")
    if not (isinstance(payload, dict) and payload.get("choices")):
        return Outcome("unexpected_status", f"HTTP 200 without choices (request id {request_id(answer)})")
    return Outcome("ok")


# ---- the kinds of request a client picks among -------------------------------------------------
def endpoint(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def random_generation(
    run: SoakRun, rng: random.Random, *, chat: bool, stream: bool, max_tokens: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A random compression and a generation body using it (``max_tokens`` None: 4-32 at random)."""
    compression = rng.choice(COMPRESSIONS)
    target_tokens = rng.choice(run.prompt_targets)
    tokens = rng.randint(4, 32) if max_tokens is None else max_tokens
    body = generation_body(
        rng, chat=chat, stream=stream, compression=compression, target_tokens=target_tokens, max_tokens=tokens
    )
    return compression, body


async def generate(run: SoakRun, client: httpx.AsyncClient, rng: random.Random) -> Attempt:
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    compression, body = random_generation(run, rng, chat=chat, stream=stream)
    timeout_s = run.args.request_timeout
    if stream:
        outcome = await streamed_generation(client, endpoint(chat), body, timeout_s)
    else:
        outcome = await non_streamed_generation(client, endpoint(chat), body, timeout_s)
    label = ("chat" if chat else "completions") + (" stream" if stream else "")
    return Attempt(label, outcome, compression_label(compression))


async def stream_then_disconnect(run: SoakRun, client: httpx.AsyncClient, rng: random.Random) -> Attempt:
    chat = rng.random() < 0.5
    compression, body = random_generation(run, rng, chat=chat, stream=True, max_tokens=32)
    outcome = await streamed_generation(
        client, endpoint(chat), body, run.args.request_timeout, close_after=rng.randint(1, 2)
    )
    return Attempt("disconnect: stream closed after 1-2 events", outcome, compression_label(compression))


async def abandon_request(run: SoakRun, client: httpx.AsyncClient, rng: random.Random) -> Attempt:
    """A non-streamed request given up after --abandon-s: the client leaves while it queues or prefills."""
    chat = rng.random() < 0.5
    compression, body = random_generation(run, rng, chat=chat, stream=False, max_tokens=32)
    label = f"disconnect: abandoned after {run.args.abandon_s:g} s"
    request = client.build_request("POST", endpoint(chat), json=body, timeout=httpx.Timeout(run.args.abandon_s))
    try:
        response = await client.send(request)
    except httpx.TimeoutException:
        return Attempt(label, Outcome("disconnect", "client timeout"), compression_label(compression))
    except httpx.TransportError as exc:
        return Attempt(label, transport_outcome(exc), compression_label(compression))
    # It answered before we gave up: judge it as any good request.
    return Attempt(label, failure_of_good_request(response) or Outcome("ok"), compression_label(compression))


def build_bad_request(client: httpx.AsyncClient, bad: BadInput) -> httpx.Request:
    if bad.raw is not None:
        request = client.build_request("POST", bad.path, content=bad.raw, headers={"Content-Type": "application/json"})
    else:
        request = client.build_request("POST", bad.path, json=bad.body)
    if bad.auth == "none":
        del request.headers["Authorization"]
    elif bad.auth == "wrong":
        request.headers["Authorization"] = "Bearer not-the-key"
    return request


async def send_bad_input(run: SoakRun, client: httpx.AsyncClient, rng: random.Random) -> Attempt:
    bad = rng.choice(run.bad_inputs)
    answer = await send(client, build_bad_request(client, bad), run.args.request_timeout)
    if isinstance(answer, Outcome):
        return Attempt(bad.label, answer)
    return Attempt(bad.label, classify_bad_answer(answer, bad.expected))


def cheap_answer_problem(route: str, response: httpx.Response) -> str | None:
    """What is wrong with a 200 from /health, /metrics or /tokenize; None when nothing."""
    if route == "metrics":
        return None if "gemserve_requests_running" in response.text else "no gemserve_requests_running gauge"
    if route == "tokenize":
        try:
            payload = response.json()
            ok = payload["count"] == len(payload["tokens"]) > 0
        except (ValueError, KeyError, TypeError):
            ok = False
        return None if ok else f"bad tokenize answer: {snippet(response)}"
    return None


async def cheap_route(run: SoakRun, client: httpx.AsyncClient, rng: random.Random) -> Attempt:
    route = rng.choice(("health", "metrics", "tokenize"))
    if route == "tokenize":
        text = filler_text(rng, rng.choice(run.prompt_targets))
        body = {"prompt": text} if rng.random() < 0.5 else {"messages": [{"role": "user", "content": text}]}
        request = client.build_request("POST", "/tokenize", json=body)
    else:
        request = client.build_request("GET", f"/{route}")
    answer = await send(client, request, run.args.request_timeout)
    if isinstance(answer, Outcome):
        return Attempt(route, answer)
    failure = failure_of_good_request(answer)
    if failure is not None:
        return Attempt(route, failure)
    problem = cheap_answer_problem(route, answer)
    return Attempt(route, Outcome("unexpected_status", problem) if problem else Outcome("ok"))


REQUEST_KINDS: dict[str, Callable[[SoakRun, httpx.AsyncClient, random.Random], Awaitable[Attempt]]] = {
    "generate": generate,
    "stream_disconnect": stream_then_disconnect,
    "abandon": abandon_request,
    "bad_input": send_bad_input,
    "cheap_route": cheap_route,
}


# ---- the load ---------------------------------------------------------------------------------
def make_client(run: SoakRun) -> httpx.AsyncClient:
    # One connection pool per client, like independent users. httpx's own timeout is a backstop:
    # asyncio.timeout around each request is what --request-timeout measures.
    return httpx.AsyncClient(
        base_url=run.url,
        headers={"Authorization": f"Bearer {run.key}"},
        timeout=httpx.Timeout(run.args.request_timeout + 10, connect=10),
    )


async def client_loop(run: SoakRun, index: int) -> None:
    rng = random.Random(run.args.seed * 1000 + index)
    names, weights = list(REQUEST_WEIGHTS), list(REQUEST_WEIGHTS.values())
    async with make_client(run) as client:
        while not run.stop.is_set() and time.monotonic() < run.deadline:
            await run.gate.wait()
            name = rng.choices(names, weights)[0]
            run.in_flight += 1
            try:
                attempt = await REQUEST_KINDS[name](run, client, rng)
            except Exception as exc:  # this script's bug, not the server's; counted so it cannot pass unseen
                logger.exception("client %d, %s", index, name)
                attempt = Attempt(name, Outcome("client_bug", f"{type(exc).__name__}: {exc}"))
            finally:
                run.in_flight -= 1
            run.tally.record(attempt)
            outcome = attempt.outcome
            if outcome.kind == "429":
                pause = min(outcome.retry_after_s, MAX_RETRY_AFTER_S)
            else:
                pause = rng.uniform(0, run.args.think_s)
            await wait_or_stop(run.stop, pause)


async def wait_for_clients(run: SoakRun, clients: list[asyncio.Task[None]]) -> None:
    """Let the clients finish their last request after the deadline; cancel them on a stop or past a grace."""
    hard_deadline = run.deadline + run.args.request_timeout + 30
    stop_wait = asyncio.create_task(run.stop.wait())
    pending: set[asyncio.Task[Any]] = set(clients)
    while pending and not run.stop.is_set():
        remaining = hard_deadline - time.monotonic()
        if remaining <= 0:
            logger.warning("clients still busy %g s past the deadline: cancelling them", run.args.request_timeout + 30)
            break
        _, pending = await asyncio.wait(pending | {stop_wait}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        pending.discard(stop_wait)
    stop_wait.cancel()
    for task in pending:
        task.cancel()  # closes their connections: the server sees disconnects, which are not counted
    await asyncio.gather(*clients, return_exceptions=True)


def install_stop_handlers(run: SoakRun) -> None:
    """Ctrl-C / SIGTERM: stop the load and write what we have; a second Ctrl-C aborts."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def on_signal(name: str) -> None:
        if run.interrupted and main_task is not None:
            main_task.cancel()
            return
        logger.warning("%s: stopping the load (again to abort)", name)
        run.interrupted = True
        run.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)


async def run_load(run: SoakRun) -> None:
    install_stop_handlers(run)
    run.load_start = time.monotonic()
    run.deadline = run.load_start + run.args.minutes * 60
    run.gate.set()
    sampler_task = asyncio.create_task(sampler(run))
    prober_task = asyncio.create_task(idle_prober(run)) if run.args.idle_probe_min > 0 else None
    clients = [asyncio.create_task(client_loop(run, i)) for i in range(run.args.clients)]
    await wait_for_clients(run, clients)
    run.stop.set()
    await sampler_task
    if prober_task is not None:
        await prober_task
    if not run.server_died:
        async with make_client(run) as client:
            run.result["samples"].append(await take_sample(run, client))
    run.result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]


# ---- the verdict ------------------------------------------------------------------------------
def least_squares_fit(points: list[tuple[float, float]]) -> tuple[float, float | None] | None:
    """(slope, its standard error) of the least-squares line; the error is None with fewer than 3 points."""
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    if len(points) < 3:
        return slope, None
    residuals = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in points)
    return slope, (residuals / (len(points) - 2) / spread) ** 0.5


def rss_trend(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """Least-squares RSS slope after the warm-up, in MiB per 10 minutes, with its standard error."""
    points = [(s["t_s"] / 60, s["rss_bytes"] / MIB) for s in samples if s["t_s"] >= warmup_s and s["rss_bytes"]]
    fit = least_squares_fit(points)
    slope, error = (None, None) if fit is None else fit
    return {
        "samples": len(points),
        "slope_mb_per_10min": None if slope is None else round(slope * 10, 2),  # MB = MiB here
        "slope_stderr_mb_per_10min": None if error is None else round(error * 10, 2),
        "first_last_mb": [round(points[0][1], 1), round(points[-1][1], 1)] if points else None,
        "min_max_mb": [round(min(y for _, y in points), 1), round(max(y for _, y in points), 1)] if points else None,
    }


def values_after(samples: list[dict[str, Any]], key: str, warmup_s: float) -> list[Any]:
    return [s[key] for s in samples if s["t_s"] >= warmup_s and s[key] is not None]


MIN_IDLE_PROBES = 5  # fewer after the warm-up and the verdict falls back to the samples under load


def verdict(
    samples: list[dict[str, Any]],
    totals: Counter[str],
    warmup_s: float,
    *,
    interrupted: bool,
    server_died: bool,
    rss_slope_limit: float = RSS_SLOPE_LIMIT_MB_PER_10MIN,
    idle_samples: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    under_load = rss_trend(samples, warmup_s)
    idle = rss_trend(idle_samples or [], warmup_s)
    judged = idle if idle["samples"] >= MIN_IDLE_PROBES else under_load
    slope_10min = judged["slope_mb_per_10min"]
    threads = values_after(samples, "threads", warmup_s)
    fds = values_after(samples, "open_fds", warmup_s)
    unexpected = sum(totals[kind] for kind in UNEXPECTED_KINDS)
    checks = {
        "no_unexpected_errors": unexpected == 0,
        "rss_flat": slope_10min is not None and abs(slope_10min) <= rss_slope_limit,
        "threads_flat": bool(threads) and max(threads) - min(threads) <= THREAD_SPREAD_LIMIT,
        "server_alive": not server_died,
        "ran_to_the_end": not interrupted,
    }
    return {
        "unexpected_errors": unexpected,
        "warmup_min": round(warmup_s / 60, 2),
        "samples_after_warmup": under_load["samples"],
        "rss_judged_on": "idle probes" if judged is idle else "samples under load",
        "rss_slope_mb_per_10min": slope_10min,  # the judged slope; MB = MiB here
        "rss_mb_after_warmup_first_last": under_load["first_last_mb"],
        "rss_under_load": under_load,
        "rss_idle": idle,
        "threads_min": min(threads, default=None),
        "threads_max": max(threads, default=None),
        "open_fds_min": min(fds, default=None),
        "open_fds_max": max(fds, default=None),
        "limits": {"rss_slope_mb_per_10min": rss_slope_limit, "thread_spread": THREAD_SPREAD_LIMIT},
        "checks": checks,
        "passed": all(checks.values()),
    }


def counters_to_dicts(counters: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
    return {name: dict(counter) for name, counter in sorted(counters.items())}


# ---- outputs ----------------------------------------------------------------------------------
def plot(result: dict[str, Any], path: Path) -> None:
    samples = result["samples"]
    warmup_min = result["verdict"]["warmup_min"]
    with figure(path, 2, 2, figsize=(12, 7), sharex=True) as (fig, axes):
        series = ((axes[0][0], "rss_bytes", "server RSS (MiB)", 1 / MIB), (axes[0][1], "threads", "server threads", 1))
        for ax, key, title, scale in (*series, (axes[1][0], "open_fds", "server open fds", 1)):
            points = [(s["t_s"] / 60, s[key] * scale) for s in samples if s[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), "-o", markersize=3, label="under load")
            ax.set_title(title)
        idle = [(s["t_s"] / 60, s["rss_bytes"] / MIB) for s in result.get("idle_samples", [])]
        if idle:
            axes[0][0].plot(*zip(*idle, strict=True), "s-", color="black", markersize=4, label="idle probes")
            axes[0][0].legend(fontsize=8)
        ax = axes[1][1]
        minutes = [s["t_s"] / 60 for s in samples]
        for kind in [k for k in (*EXPECTED_KINDS, *UNEXPECTED_KINDS) if any(k in s["outcomes"] for s in samples)]:
            style = "--" if kind in UNEXPECTED_KINDS else "-"
            ax.plot(minutes, [s["outcomes"].get(kind, 0) for s in samples], style, label=kind)
        ax.set_title("cumulative requests by outcome")
        ax.legend(fontsize=8)
        for ax in axes.flat:
            ax.axvline(warmup_min, color="grey", linestyle=":", linewidth=1)  # end of the warm-up
            ax.grid(alpha=0.3)
        for ax in axes[1]:
            ax.set_xlabel("minutes of load")
        outcome = "passed" if result["verdict"]["passed"] else "FAILED"
        fig.suptitle(f"Soak, {result['model']}, {result['settings']['clients']} clients: {outcome}")


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def outcome_cells(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda item: -item[1]))


def trend_rows(v: dict[str, Any]) -> list[str]:
    rows = []
    for key, label in (("rss_idle", "idle probes"), ("rss_under_load", "samples under load")):
        trend = v.get(key)
        if not trend or trend["slope_mb_per_10min"] is None:
            continue
        judged = v.get("rss_judged_on") == label
        rows.append(
            f"| RSS slope, {label} ({trend['samples']}, least squares) | "
            f"{'**' if judged else ''}{fmt(trend['slope_mb_per_10min'], '+.2f')} ± "
            f"{fmt(trend['slope_stderr_mb_per_10min'], '.2f')} MiB / 10 min{'**' if judged else ''} "
            f"(range {' - '.join(fmt(x, '.0f') for x in trend['min_max_mb'])} MiB)"
            + (f"; judged, limit ±{v['limits']['rss_slope_mb_per_10min']:g} |" if judged else " |")
        )
    return rows


def doc_heading(result: dict[str, Any]) -> str:
    """One section per model and duration: a 2-hour run does not replace the record of a 30-minute one."""
    return f"## Soak: {result['settings']['minutes']:g} minutes of mixed traffic — {model_slug(result['model'])}"


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    machine, settings, v, server = result["machine"], result["settings"], result["verdict"], result["server"]
    methods = ", ".join(f"`{compression_label(c)}`" for c in COMPRESSIONS)
    first_last = v["rss_mb_after_warmup_first_last"] or [None, None]
    lines = [
        doc_heading(result),
        "",
        f"Run {result['started_at']} to {result['finished_at']} with `{result['command']}` on {machine['cpu']} "
        f"({machine['cpu_cores']} cores, torch {machine['torch']}): {settings['minutes']:g} minutes of load, "
        f"{settings['clients']} concurrent clients, seed {settings['seed']}. The script starts `gemserve serve --model "
        f"{result['model']} --max-queue {settings['max_queue']}` as a subprocess on 127.0.0.1 (a random API key in "
        "`GEMSERVE_API_KEY`); each client loops over a random mix: completions and chat completions, streamed or "
        f"not, prompts of ~{min(settings['prompt_tokens'])}-{max(settings['prompt_tokens'])} tokens, 4-32 new "
        f"tokens, greedy or T=0.7 with a seed, compression {methods}; streams closed after 1-2 events and requests "
        f"abandoned by a {settings['abandon_s']:g} s client timeout; bad inputs that must get a 4xx error JSON "
        f"({', '.join(settings['bad_inputs']).replace('bad: ', '')}); `/health`, `/metrics`, `/tokenize`. The "
        f"server's RSS, threads and open fds are sampled every {settings['sample_s']:g} s from /proc; every "
        f"{settings.get('idle_probe_min', 0):g} min an idle probe holds the clients back until the server runs "
        "nothing and reads its RSS then (the leak measure: under load the RSS swings with the prompts in flight). "
        "Load average "
        f"(1/5/15 min) at start / end: {result['loadavg_start']} / {result.get('loadavg_end')}. Data "
        f"`bench/results/{out_path.name}`, plot `bench/results/{out_path.with_suffix('.png').name}`.",
        "",
        "| outcome | count | expected |",
        "|---|---:|---|",
        *(f"| {kind} | {result['totals'].get(kind, 0)} | yes |" for kind in EXPECTED_KINDS),
        *(f"| {kind} | {result['totals'].get(kind, 0)} | no |" for kind in UNEXPECTED_KINDS),
        "",
        "| request | count | outcomes |",
        "|---|---:|---|",
        *(f"| {name} | {sum(c.values())} | {outcome_cells(c)} |" for name, c in result["by_request"].items()),
        "",
        "| verdict (after the warm-up) | value |",
        "|---|---|",
        f"| unexpected outcomes | {v['unexpected_errors']} |",
        f"| warm-up | {v['warmup_min']:g} min ({v['samples_after_warmup']} samples after it) |",
        *trend_rows(v),
        f"| RSS first / last sample under load | {' / '.join(fmt(x) for x in first_last)} MiB |",
        f"| threads min-max | {v['threads_min']}-{v['threads_max']} (limit: spread ≤ {THREAD_SPREAD_LIMIT}) |",
        f"| open fds min-max | {v['open_fds_min']}-{v['open_fds_max']} |",
        f"| server shutdown | {server.get('stopped_by')}, exit code {server.get('exit_code')}, "
        f"{fmt(server.get('shutdown_s'))} s |",
        f"| **passed** | **{'yes' if v['passed'] else 'no'}** |",
    ]
    if result["sample_messages"]:
        lines += ["", "Unexpected outcomes (first messages):", ""]
        for kind, messages in result["sample_messages"].items():
            lines += [f"- `{kind}`: {message.replace('|', '/')}" for message in messages[:2]]
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any], out_path: Path) -> str:
    v = result["verdict"]
    minutes = result["samples"][-1]["t_s"] / 60 if result["samples"] else 0.0
    return (
        f"soak {model_slug(result['model'])}: {'PASSED' if v['passed'] else 'FAILED'}: "
        f"{sum(result['totals'].values())} requests in {minutes:.1f} min, {v['unexpected_errors']} unexpected, "
        f"RSS slope ({v.get('rss_judged_on', 'samples under load')}) {fmt(v['rss_slope_mb_per_10min'], '+.2f')} "
        f"MiB/10 min, threads {v['threads_min']}-"
        f"{v['threads_max']} after warm-up; {out_path}"
    )


# ---- putting it together ----------------------------------------------------------------------
def effective_warmup_min(args: argparse.Namespace) -> float:
    # A short check run still leaves half of its samples for the fit.
    return min(args.warmup_min, args.minutes / 2)


def new_result(args: argparse.Namespace, argv: list[str], command: list[str], log_path: Path) -> dict[str, Any]:
    return {
        "benchmark": "soak",
        "model": args.model,
        "command": " ".join(["python -m bench.soak", shlex.join(argv)]).strip(),
        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_description(),
        "settings": {
            "minutes": args.minutes,
            "clients": args.clients,
            "seed": args.seed,
            "sample_s": args.sample_s,
            "warmup_min": effective_warmup_min(args),
            "warmup_min_requested": args.warmup_min,
            "rss_slope_limit_mb_per_10min": args.rss_slope_limit,
            "request_timeout_s": args.request_timeout,
            "abandon_s": args.abandon_s,
            "think_s": args.think_s,
            "idle_probe_min": args.idle_probe_min,
            "max_queue": args.max_queue,
            "request_weights": REQUEST_WEIGHTS,
            "compressions": list(COMPRESSIONS),
        },
        "server": {"command": command, "log": str(log_path)},
        "samples": [],
        "idle_samples": [],
        "totals": {},
    }


def prepare_run(
    args: argparse.Namespace, url: str, key: str, proc: subprocess.Popen[bytes], result: dict[str, Any], out: Path
) -> SoakRun:
    served_model, max_model_len, token_id = server_facts(url, key)
    # Good prompts stay well inside the context (room for the chat template and the new tokens).
    targets = [t for t in PROMPT_TOKENS if t + 256 <= max_model_len] or [max(16, max_model_len // 4)]
    bad = bad_inputs(max_model_len, token_id)
    result["served_model"] = served_model
    result["max_model_len"] = max_model_len
    result["settings"].update(prompt_tokens=targets, bad_inputs=[b.label for b in bad])
    return SoakRun(args, url, key, proc, targets, bad, result, out)


def finish(run: SoakRun, out_path: Path, log_path: Path, no_doc: bool) -> bool:
    result, tally = run.result, run.tally
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result.setdefault("loadavg_end", [round(x, 2) for x in os.getloadavg()])
    result["totals"] = dict(tally.totals)
    result["by_request"] = counters_to_dicts(tally.by_request)
    result["by_compression"] = counters_to_dicts(tally.by_compression)
    result["sample_messages"] = tally.messages
    result["interrupted"] = run.interrupted
    server_died = run.server_died or result["server"].get("stopped_by") is None
    result["verdict"] = verdict(
        result["samples"],
        tally.totals,
        result["settings"]["warmup_min"] * 60,
        interrupted=run.interrupted,
        server_died=server_died,
        rss_slope_limit=result["settings"]["rss_slope_limit_mb_per_10min"],
        idle_samples=result["idle_samples"],
    )
    if not result["verdict"]["passed"]:
        result["server"]["log_tail"] = log_tail(log_path)
    write_json(out_path, result)
    try:
        plot(result, out_path.with_suffix(".png"))
    except Exception:  # a missing plot must not hide the verdict
        logger.exception("could not draw the plot")
    if not no_doc:
        replace_doc_section(doc_heading(result), markdown_section(result, out_path))
    print(summary_line(result, out_path))
    return bool(result["verdict"]["passed"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct", help="passed to gemserve serve --model")
    parser.add_argument("--minutes", type=float, default=30.0, help="minutes of load (fractions allowed)")
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients")
    parser.add_argument("--seed", type=int, default=12_000, help="seeds each client's choices")
    parser.add_argument("--sample-s", type=float, default=15.0, help="seconds between samples of the server")
    parser.add_argument("--warmup-min", type=float, default=5.0, help="minutes left out of the verdict's fits")
    parser.add_argument(
        "--idle-probe-min",
        type=float,
        default=2.0,
        help="minutes between idle probes (the clients pause until the server is idle, then its RSS is read); 0: none",
    )
    parser.add_argument(
        "--rss-slope-limit",
        type=float,
        default=RSS_SLOPE_LIMIT_MB_PER_10MIN,
        help="largest |RSS slope| after the warm-up that passes, MiB per 10 minutes",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=300.0, help="seconds before a good request is a timeout"
    )
    parser.add_argument("--abandon-s", type=float, default=0.3, help="client timeout of the abandoned requests")
    parser.add_argument("--think-s", type=float, default=0.2, help="longest random pause between a client's requests")
    parser.add_argument("--max-queue", type=int, default=8, help="gemserve serve --max-queue")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /ready")
    parser.add_argument("--shutdown-grace", type=float, default=60.0, help="seconds after SIGINT before SIGTERM")
    parser.add_argument("--out", help="result JSON (default bench/results/soak_<model>.json); the PNG goes beside it")
    parser.add_argument("--server-log", help="the server's stdout+stderr (default: a file in the temp directory)")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.sample_s <= 0:
        parser.error("--minutes and --sample-s must be positive, --clients at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else one INFO line per request
    slug = model_slug(args.model)
    out_path = Path(args.out) if args.out else RESULTS_DIR / f"soak_{slug}.json"
    log_path = Path(args.server_log) if args.server_log else Path(tempfile.gettempdir()) / f"gemserve_soak_{slug}.log"
    key = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = serve_command(port, "--model", args.model, "--max-queue", str(args.max_queue))
    result = new_result(args, argv, command, log_path)
    logger.info("starting %s (log: %s)", shlex.join(command), log_path)
    proc = start_server(command, checkout_environment(key), log_path)
    result["server"]["pid"] = proc.pid
    try:
        result["server"]["ready_s"] = round(wait_until_ready(proc, url, args.ready_timeout, log_path), 1)
        logger.info("ready after %.0f s on %s; load for %g min", result["server"]["ready_s"], url, args.minutes)
        run = prepare_run(args, url, key, proc, result, out_path)
        asyncio.run(run_load(run))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: aborted", file=sys.stderr)
        return 130
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        result["server"].update(stop_server(proc, args.shutdown_grace))
        logger.info("server stopped: %s", result["server"])
    return 0 if finish(run, out_path, log_path, args.no_doc) else 1


if __name__ == "__main__":
    raise SystemExit(main())
