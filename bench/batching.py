"""Continuous batching on the hf backend (issue 15): one ``gemserve serve`` process, three loads.

1. ``throughput``: ``gemserve loadtest``, closed loop, 512-token prompts, 64 output tokens
   (``--ignore-eos``), ``none``, at concurrency 1 and 4: output tokens/s (target c4 >= 2.5x c1).
2. ``compression``: the same at concurrency 8 with 4K prompts, ``none`` vs ``gemfilter:1024``:
   request throughput, TTFT and ITL percentiles; and at concurrency 1 for each method's
   single-request TTFT (target: GemFilter's throughput gain under load >= its TTFT gain alone).
3. ``chunked_prefill``: three streams of short prompts decode; their inter-token latency (client
   side, every SSE chunk) over a window alone gives the p50; then an 8K prompt is sent and their p99
   while it is prefilled (until its first token) is compared with it (target <= 3x). Direct streams,
   since the load tester has no "one request in the middle" mode.

Run it with nothing else on the machine (the load average before and after is recorded):

    python -m bench.batching [--quick]

Writes bench/results/batching_smollm2.json + .png and the "Continuous batching" section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import RESULTS_DIR, brief, loadtest, machine_description, replace_doc_section, write_json
from bench.soak import free_port, start_server, stop_server, wait_until_ready
from clients.loadtest_report import percentile
from server.engine.scheduler import DEFAULT_PREFILL_CHUNK_TOKENS

HEADING = "## Continuous batching (hf backend)"


def throughput(url: str, work: Path, quick: bool) -> dict[str, Any]:
    runs = {}
    for concurrency, requests in ((1, 3 if quick else 5), (4, 8 if quick else 12)):
        summary = loadtest(
            url,
            work / f"c{concurrency}",
            input_len=512,
            output_len=64,
            method="none",
            concurrency=concurrency,
            num_requests=requests,
            warmup=1,
        )
        runs[f"c{concurrency}"] = brief(summary["none"])
    ratio = runs["c4"]["output_token_throughput"] / runs["c1"]["output_token_throughput"]
    return {"runs": runs, "c4_over_c1_output_tokens_per_s": ratio}


def compression(url: str, work: Path, quick: bool) -> dict[str, Any]:
    methods = "none,gemfilter:1024"
    alone = loadtest(
        url, work / "alone", input_len=4096, output_len=64, compare=methods, concurrency=1, num_requests=2, warmup=1
    )
    loaded = loadtest(
        url,
        work / "loaded",
        input_len=4096,
        output_len=64,
        compare=methods,
        concurrency=8,
        num_requests=8 if quick else 12,
        warmup=1,
    )
    result = {
        "alone_c1": {k: brief(v) for k, v in alone.items()},
        "loaded_c8": {k: brief(v) for k, v in loaded.items()},
    }
    none, gem = result["loaded_c8"]["none"], result["loaded_c8"]["gemfilter:1024"]
    result["gemfilter_gain_under_load"] = gem["request_throughput"] / none["request_throughput"]
    solo_none, solo_gem = result["alone_c1"]["none"], result["alone_c1"]["gemfilter:1024"]
    result["gemfilter_ttft_gain_alone"] = solo_none["ttft_ms"]["p50"] / solo_gem["ttft_ms"]["p50"]
    return result


def stream_tokens(url: str, body: dict[str, Any], times: list[float], stop: threading.Event) -> None:
    """POST a streamed completion; append the arrival time of every chunk until ``stop``."""
    with (
        httpx.Client(base_url=url, timeout=None) as client,
        client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response,
    ):
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"text"' in line:
                times.append(time.perf_counter())
            if stop.is_set():
                return


def chunked_prefill(url: str, quick: bool, long_tokens: int = 8000) -> dict[str, Any]:
    from evals.needles import build_case

    long_case = build_case(long_tokens, depth=0.5, seed=815)
    short = {"max_tokens": 4000, "ignore_eos": True, "temperature": 0}
    streams = [{"prompt": f"Story {i}: once upon a time, in a town by the sea,", **short} for i in range(3)]
    stop = threading.Event()
    token_times: list[list[float]] = [[] for _ in streams]
    threads = [
        threading.Thread(target=stream_tokens, args=(url, body, times, stop), daemon=True)
        for body, times in zip(streams, token_times, strict=True)
    ]
    for thread in threads:
        thread.start()
    while min(len(t) for t in token_times) < 5:  # all three decoding together
        time.sleep(0.05)
    window_start = time.perf_counter()
    time.sleep(15 if quick else 30)
    window_end = time.perf_counter()
    sent = time.perf_counter()
    response = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": long_case.completion_prompt(), "max_tokens": 1, "temperature": 0},
        timeout=None,
    )
    long_done = time.perf_counter()
    response.raise_for_status()
    long_body = response.json()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    def gaps(start: float, end: float) -> list[float]:
        out = []
        for times in token_times:
            inside = [t for t in times if start <= t <= end]
            out += [(b - a) * 1000.0 for a, b in itertools.pairwise(inside)]
        return out

    alone, during = gaps(window_start, window_end), gaps(sent, long_done)
    p50_alone = statistics.median(alone)
    return {
        "long_prompt_tokens": long_body["usage"]["prompt_tokens"],
        "long_ttft_ms": long_body["metrics"]["ttft_ms"],
        "long_prefill_ms": long_body["metrics"]["prefill_ms"],
        "streams": len(streams),
        "itl_alone_ms": {"n": len(alone), "p50": p50_alone, "p99": percentile(alone, 99)},
        "itl_during_long_prefill_ms": {
            "n": len(during),
            "p50": statistics.median(during) if during else None,
            "p99": percentile(during, 99) if during else None,
            "max": max(during) if during else None,
        },
        "p99_during_over_p50_alone": percentile(during, 99) / p50_alone if during else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    runs = result["throughput"]["runs"]
    axes[0].bar(list(runs), [r["output_token_throughput"] for r in runs.values()], color=["#888", "#2a7"])
    axes[0].set_title("512-token prompts, none: output tok/s")
    loaded = result["compression"]["loaded_c8"]
    axes[1].bar(list(loaded), [r["request_throughput"] for r in loaded.values()], color=["#888", "#27a"])
    axes[1].set_title("4K prompts, concurrency 8: requests/s")
    itl = result["chunked_prefill"]
    axes[2].bar(
        ["p50 alone", f"p99 during a {itl['long_prompt_tokens']}-token prefill"],
        [itl["itl_alone_ms"]["p50"], itl["itl_during_long_prefill_ms"]["p99"] or 0],
        color=["#888", "#a72"],
    )
    axes[2].axhline(3 * itl["itl_alone_ms"]["p50"], color="red", linestyle="--", label="3x p50")
    axes[2].set_title("inter-token latency of 3 streams, ms")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def doc_section(result: dict[str, Any]) -> str:
    t, c, p = result["throughput"], result["compression"], result["chunked_prefill"]
    lines = [
        HEADING,
        "",
        f"`python -m bench.batching`: `gemserve serve {result['server_flags']}`, SmolLM2-135M "
        f"{result['machine']['dtype']} on "
        f"{result['machine']['cpu_cores']} CPU cores; load average {result['loadavg_before']} before, "
        f"{result['loadavg_after']} after. Closed-loop runs through `gemserve loadtest --ignore-eos`.",
        "",
        "| load | method | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(load: str, method: str, r: dict[str, Any]) -> str:
        return (
            f"| {load} | {method} | {r['request_throughput']:.3f} | {r['output_token_throughput']:.1f} | "
            f"{r['ttft_ms']['p50']:.0f} | {r['ttft_ms']['p99']:.0f} | {r['itl_ms']['p50']:.0f} | "
            f"{r['itl_ms']['p99']:.0f} |"
        )

    lines += [row(f"512 tok, {k}", "none", v) for k, v in t["runs"].items()]
    lines += [row(f"4K tok, {k.split('_')[-1]}", m, v) for k in ("alone_c1", "loaded_c8") for m, v in c[k].items()]
    lines += [
        "",
        "- Output tokens/s at concurrency 4 over 1 (512-token prompts): "
        f"**{t['c4_over_c1_output_tokens_per_s']:.2f}x**.",
        f"- GemFilter's request throughput over none at concurrency 8 (4K): **{c['gemfilter_gain_under_load']:.2f}x**; "
        f"its TTFT gain alone: {c['gemfilter_ttft_gain_alone']:.2f}x.",
        f"- Three streams decoding: ITL p50 {p['itl_alone_ms']['p50']:.0f} ms alone; while a "
        f"{p['long_prompt_tokens']}-token prompt was prefilled ({p['long_ttft_ms'] / 1000:.0f} s to its first token) "
        f"their p99 was {p['itl_during_long_prefill_ms']['p99']:.0f} ms "
        f"(max {p['itl_during_long_prefill_ms']['max']:.0f}): **{p['p99_during_over_p50_alone']:.2f}x** the p50.",
        "",
        "Chunk size (`--prefill-chunk-tokens`) while the three streams decode and the long prompt is prefilled:",
        "",
        "| chunk tokens | long prompt TTFT s | stream ITL p50 alone ms | p99 during ms | max during ms | p99 / p50 |",
        "|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {size} | {r['long_ttft_ms'] / 1000:.0f} | {r['itl_alone_ms']['p50']:.0f} | "
            f"{r['itl_during_long_prefill_ms']['p99']:.0f} | {r['itl_during_long_prefill_ms']['max']:.0f} | "
            f"{r['p99_during_over_p50_alone']:.2f} |"
            for size, r in result["chunked_prefill_by_chunk"].items()
        ],
        "",
        "![continuous batching](../bench/results/batching_smollm2.png)",
    ]
    return "\n".join(lines) + "\n"


def serve(work: Path, flags: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *flags]
    proc = start_server(command, {**os.environ, "GEMSERVE_LOG_LEVEL": "warning"}, work / "server.log")
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, 600, work / "server.log")
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run, not for the docs)")
    parser.add_argument("--skip", default="", help="comma list of scenarios to skip (for debugging)")
    parser.add_argument("--chunk-sizes", default="32,128", help="--prefill-chunk-tokens values for chunked_prefill")
    parser.add_argument("--render", type=Path, help="only redraw the PNG and the docs section from this JSON")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        plot(result, args.render.with_suffix(".png"))
        replace_doc_section(HEADING, doc_section(result))
        return
    flags = ["--max-concurrency", "8"]
    result: dict[str, Any] = {
        "benchmark": "batching",
        "model": "smollm2-135m-instruct",
        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_description(),
        "server_flags": " ".join(flags),
        "quick": args.quick,
    }
    skip = set(args.skip.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, url = serve(work, flags)
        try:
            for name, run in (("throughput", throughput), ("compression", compression)):
                if name not in skip:
                    result[name] = run(url, work / name, args.quick)
                    print(name, json.dumps(result[name])[:400], flush=True)
        finally:
            result["server_stop"] = stop_server(proc, 30)
        if "chunked_prefill" not in skip:
            result["chunked_prefill_by_chunk"] = {}
            for size in (int(x) for x in args.chunk_sizes.split(",")):
                proc, url = serve(work, [*flags, "--prefill-chunk-tokens", str(size)])
                try:
                    run = chunked_prefill(url, args.quick)
                finally:
                    stop_server(proc, 30)
                result["chunked_prefill_by_chunk"][str(size)] = run
                print("chunked_prefill", size, json.dumps(run), flush=True)
            default = str(DEFAULT_PREFILL_CHUNK_TOKENS)
            result["chunked_prefill"] = result["chunked_prefill_by_chunk"].get(default)
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    path = RESULTS_DIR / ("batching_smollm2_quick.json" if args.quick else "batching_smollm2.json")
    write_json(path, result)
    if not args.quick and not args.skip:
        plot(result, path.with_suffix(".png"))
        replace_doc_section(HEADING, doc_section(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
