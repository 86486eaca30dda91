"""Server overhead: p50 latency of a 16-token completion through HTTP minus a direct engine call.

One process loads the default model once and serves it with uvicorn on a loopback port
(a background thread). Each round runs the same request both ways, in alternating order:

- ``direct``: ``HFEngine.generate`` on the same engine object, in this thread;
- ``http``: ``POST /v1/completions`` (not streamed, keep-alive ``httpx`` client) to the server,
  which tokenises, queues, runs the engine in its worker thread and serialises the response.

Same token ids (the prompt is sent as ids so tokenisation is not part of either side), greedy,
``ignore_eos``, exactly 16 new tokens. Reported: p50 of each and their difference (the target).
On a shared CPU the model's own run-to-run noise (hundreds of ms) swamps a few ms of overhead
in that difference, so two views free of model noise come with it. Paired: for every request,
wall time minus the engine's own working time for that request (``e2e_ms``, minus ``queue_ms``
on the HTTP side), so the model's noise cancels; the overhead is the HTTP gap's p50 minus the
direct gap's p50 (what HTTP, validation, admission, the thread hop and serialisation add).
And the round trip when generation is stubbed out (16 canned tokens, no forward pass), beside
a bare ``GET /health`` round trip.

    python -m bench.server_overhead [--runs 24] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator
from statistics import median
from typing import Any

import httpx

from bench.common import RESULTS_DIR, machine_description, write_json

NEW_TOKENS = 16
PROMPT = "Write a short note about the history of the printing press and why it mattered."


def p50(values: list[float]) -> float:
    return round(median(values), 3)


def direct_ms(engine: Any, prompt_ids: list[int]) -> tuple[float, float]:
    """Wall time of a direct call, and the engine's own working time (its ``e2e_ms``)."""
    from server.engine.types import GenerationRequest, SamplingParams

    request = GenerationRequest(
        prompt_ids=prompt_ids, sampling=SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    )
    start = time.perf_counter()
    result = engine.generate(request)
    elapsed = (time.perf_counter() - start) * 1000.0
    assert result.completion_tokens == NEW_TOKENS, result.completion_tokens
    return elapsed, result.metrics.e2e_ms


def http_ms(client: httpx.Client, prompt_ids: list[int]) -> tuple[float, float]:
    """Client wall time, and the engine's own working time for the same request: its e2e
    (accepted -> last token) minus the time before it started (validation, admission, queue)."""
    payload = {"prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    response = client.post("/v1/completions", json=payload)
    elapsed = (time.perf_counter() - start) * 1000.0
    response.raise_for_status()
    body = response.json()
    assert body["usage"]["completion_tokens"] == NEW_TOKENS, body["usage"]
    metrics = body["metrics"]
    return elapsed, float(metrics["e2e_ms"]) - float(metrics["queue_ms"])


class StubGeneration:
    """The real engine for checks and tokenisation; generation replaced by 16 canned tokens."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, request: Any) -> Iterator[Any]:
        from contract.protocol import CompressionInfo, MetricsInfo
        from server.engine.types import GenerationResult, TokenDelta

        method = self.inner.check_request(request)
        tokens = [42] * request.sampling.max_tokens
        for token in tokens:
            yield TokenDelta(token_id=token, text="x")
        n = len(request.prompt_ids)
        report = CompressionInfo(method=method.name, prompt_tokens=n, kept_tokens=n, ratio=1.0, select_ms=0.0)
        yield GenerationResult("x" * len(tokens), tokens, "length", n, report, MetricsInfo())


def measure(runs: int, warmup: int) -> dict[str, Any]:
    from server.app import create_app, serve_in_background
    from server.engine.hf import HFEngine
    from server.engine.hf_async import HFAsyncEngine
    from server.models import load_model
    from server.settings import Settings

    engine = HFEngine(load_model(device="cpu"))
    prompt_ids = engine.encode_prompt(PROMPT)
    direct, http, direct_gap, http_gap, stub, stub_cpu, health = [], [], [], [], [], [], []
    with (
        serve_in_background(create_app(Settings(), engine=HFAsyncEngine(engine))) as url,
        httpx.Client(base_url=url, timeout=600) as c,
    ):
        for _ in range(warmup):
            direct_ms(engine, prompt_ids)
            http_ms(c, prompt_ids)
        for i in range(runs):
            # Alternate which goes first so drift in machine load hits both sides alike.
            order = ("direct", "http") if i % 2 == 0 else ("http", "direct")
            for side in order:
                if side == "direct":
                    wall, engine_work = direct_ms(engine, prompt_ids)
                    direct.append(wall)
                    direct_gap.append(wall - engine_work)
                else:
                    wall, engine_work = http_ms(c, prompt_ids)
                    http.append(wall)
                    http_gap.append(wall - engine_work)
            logging.info("round %d: direct %.1f ms, http %.1f ms", i, direct[-1], http[-1])
    stub_app = create_app(Settings(), engine=HFAsyncEngine(StubGeneration(engine)))
    with serve_in_background(stub_app) as url, httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(warmup):
            http_ms(c, prompt_ids)
        for _ in range(max(runs, 100)):
            cpu_start = time.process_time()
            stub.append(http_ms(c, prompt_ids)[0])
            # Client and server share this process: its CPU time is the path's own cost, free of
            # the waits for a core that dominate wall time on a loaded machine.
            stub_cpu.append((time.process_time() - cpu_start) * 1000.0)
            start = time.perf_counter()
            c.get("/health").raise_for_status()
            health.append((time.perf_counter() - start) * 1000.0)
    return {
        "benchmark": "server_overhead",
        "model": engine.model_name,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": NEW_TOKENS,
        "runs": runs,
        "warmup": warmup,
        "machine": machine_description(),
        "p50_ms": {
            "direct_engine": p50(direct),
            "http": p50(http),
            "overhead_http_minus_direct": round(median(http) - median(direct), 3),
            # Each side's wall time minus the engine's working time for that very request: the
            # model's noise cancels per request, what is left is what wraps the engine.
            "direct_wall_minus_engine_work": p50(direct_gap),
            "http_wall_minus_engine_work": p50(http_gap),
            "overhead_paired": round(median(http_gap) - median(direct_gap), 3),
            "http_round_trip_stub_generation": p50(stub),
            "http_round_trip_stub_generation_cpu_time": p50(stub_cpu),
            "http_round_trip_health": p50(health),
        },
        # The minimum shows the path's own cost when no other process preempted it.
        "min_ms": {
            "overhead_paired": round(min(http_gap) - min(direct_gap), 3),
            "http_round_trip_stub_generation": round(min(stub), 3),
            "http_round_trip_health": round(min(health), 3),
        },
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "samples_ms": {
            "direct": direct,
            "http": http,
            "direct_gap": direct_gap,
            "http_gap": http_gap,
            "stub_http": stub,
            "stub_http_cpu": stub_cpu,
            "health": health,
        },
    }


def markdown_table(result: dict[str, Any]) -> str:
    p, low = result["p50_ms"], result["min_ms"]
    rows = [
        ("direct `HFEngine.generate`", p["direct_engine"], None),
        ("through HTTP (`POST /v1/completions`)", p["http"], None),
        ("**overhead: HTTP p50 − direct p50**", p["overhead_http_minus_direct"], None),
        ("direct: wall − engine working time, per request", p["direct_wall_minus_engine_work"], None),
        ("HTTP: client wall − engine working time, per request", p["http_wall_minus_engine_work"], None),
        ("**overhead, paired: the two rows above subtracted**", *pair(p, low, "overhead_paired")),
        (
            "HTTP round trip, generation stubbed out (16 canned tokens)",
            *pair(p, low, "http_round_trip_stub_generation"),
        ),
        ("same, CPU time of client + server (one process)", p["http_round_trip_stub_generation_cpu_time"], None),
        ("HTTP round trip of `GET /health` (transport floor)", *pair(p, low, "http_round_trip_health")),
    ]
    lines = ["| measured | p50 ms | min ms |", "|---|---:|---:|"]
    lines += [f"| {label} | {value:.1f} | {'' if best is None else f'{best:.1f}'} |" for label, value, best in rows]
    return "\n".join(lines)


def pair(p50s: dict[str, float], mins: dict[str, float], key: str) -> tuple[float, float]:
    return p50s[key], mins[key]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=24, help="measured rounds (each: one direct + one HTTP)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("gemserve.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = measure(args.runs, args.warmup)
    path = RESULTS_DIR / "server_overhead.json"
    write_json(path, result)
    print(json.dumps(result["p50_ms"], indent=2))
    print(markdown_table(result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
