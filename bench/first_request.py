"""The first request after start-up against the ones after it, with and without the engine's warm-up.

A just-started server's first forward down each path pays one-time costs (kernel set-up on the
CPU, the CUDA context and kernel loading on a GPU); ``HFEngine.warm_up`` (run by ``gemserve serve``
before ``/ready``, ``--no-warmup`` to skip) pays them on a short prompt instead. Each configuration
(method x warm-up off/on) runs in a fresh process, as a new server would: load the model, warm up
or not, then ``--requests`` requests of one needle prompt through ``HFEngine.generate``. Fresh
processes in turn (A, B, C, D, then B, C, D, A ...) over ``--repeats`` rounds, so drift hits all alike.

Writes ``bench/results/first_request_<model>.json`` + PNG and a table in docs/benchmarks.md.

    python -m bench.first_request [--tokens 1500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    figure,
    model_slug,
    needle_prompt,
    replace_doc_section,
    report_result,
    result_header,
    rotated,
    run_in_fresh_process,
    stamp_finish,
    write_json,
)

DOC_HEADING = "## The first request after start-up: the engine's warm-up"
CONFIGS = [("none", False), ("none", True), ("gemfilter", False), ("gemfilter", True)]


def label(method: str, warm: bool) -> str:
    return f"{method}, {'warm-up' if warm else 'cold'}"


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: load, maybe warm up, then the requests; TTFT and end-to-end ms of each."""
    from server.engine.hf import HFEngine
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
    from server.models import load_model

    engine = HFEngine(load_model(payload["model"]))
    warm_up_ms = engine.warm_up() if payload["warm"] else None
    prompt = needle_prompt(engine, payload["tokens"], depth=0.5, seed=7).prompt_ids
    knobs = {"budget": payload["budget"]} if payload["method"] == "gemfilter" else {}
    requests = []
    for _ in range(payload["requests"]):
        sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        result = engine.generate(GenerationRequest(prompt, sampling, CompressionSpec(payload["method"], knobs)))
        requests.append({"ttft_ms": result.metrics.ttft_ms, "e2e_ms": (time.perf_counter() - started) * 1000.0})
    return {"warm_up_ms": warm_up_ms, "prompt_tokens": len(prompt), "requests": requests}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: the first request's TTFT and the later ones' (medians over the rounds)."""
    rows = []
    for method, warm in CONFIGS:
        mine = [r for r in runs if (r["method"], r["warm"]) == (method, warm)]
        first = statistics.median(r["requests"][0]["ttft_ms"] for r in mine)
        later = statistics.median(q["ttft_ms"] for r in mine for q in r["requests"][1:])
        warm_ups = [r["warm_up_ms"] for r in mine if r["warm_up_ms"] is not None]
        rows.append(
            {
                "config": label(method, warm),
                "rounds": len(mine),
                "first_ttft_ms": round(first, 1),
                "later_ttft_ms": round(later, 1),
                "first_over_later": round(first / later, 3),
                "warm_up_ms": round(statistics.median(warm_ups), 1) if warm_ups else None,
            }
        )
    return rows


def doc_section(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        DOC_HEADING,
        "",
        f"`python -m bench.first_request --tokens {result['tokens']} --repeats {result['repeats']}`, "
        f"{machine['cpu']} ({machine['cpu_cores']} cores), {result['dtype']}, torch {machine['torch']}, "
        f"{result['started_at']}; load average {result['loadavg_before']} before, {result['loadavg_after']} after. "
        f"{result['model']}, a {result['prompt_tokens']}-token needle prompt, {result['requests']} requests per fresh "
        f"process (GemFilter k={result['budget']}), {result['repeats']} processes per configuration, in turn; "
        f"medians. `bench/results/{Path(result['path']).name}`.",
        "",
        "| configuration | first request TTFT ms | later requests TTFT ms | first / later | warm-up at start ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        warm = "" if row["warm_up_ms"] is None else f"{row['warm_up_ms']:.0f}"
        lines.append(
            f"| {row['config']} | {row['first_ttft_ms']:.0f} | {row['later_ttft_ms']:.0f} | "
            f"{row['first_over_later']:.2f}x | {warm} |"
        )
    by = {row["config"]: row for row in result["summary"]}
    cold, warm_row = by[label("gemfilter", False)], by[label("gemfilter", True)]
    lines += [
        "",
        f"Reading: in a fresh process the first GemFilter request took {cold['first_over_later']:.2f}x the "
        f"TTFT of the ones after it (`none`: {by[label('none', False)]['first_over_later']:.2f}x): one-time "
        f"set-up on the first forward down each path. After the warm-up ({warm_row['warm_up_ms']:.0f} ms, "
        f"before `/ready`) the first request is {warm_row['first_over_later']:.2f}x (`none`: "
        f"{by[label('none', True)]['first_over_later']:.2f}x). `gemserve serve` warms up by default "
        "(`--no-warmup` skips it).",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["summary"]
    with figure(path, figsize=(7, 3.5)) as (_, ax):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["first_ttft_ms"] for r in rows], 0.4, label="first request")
        ax.bar([i + 0.2 for i in x], [r["later_ttft_ms"] for r in rows], 0.4, label="later requests")
        ax.set_xticks(list(x), [r["config"] for r in rows], fontsize=8)
        ax.set_ylabel("TTFT ms (median)")
        ax.set_title(f"{result['model']}: first request after start-up, {result['prompt_tokens']} tokens", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=1500, help="needle prompt length")
    parser.add_argument("--budget", type=int, default=256, help="GemFilter's budget")
    parser.add_argument("--requests", type=int, default=4, help="requests per fresh process")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per configuration")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 2:
        parser.error("--requests must be at least 2: the first request is compared with the later ones")
    if args.worker:
        report_result(worker(json.loads(args.worker)))
        return
    out = RESULTS_DIR / f"first_request_{model_slug(args.model)}.json"
    result: dict[str, Any] = {
        **result_header(args.model),
        "tokens": args.tokens,
        "budget": args.budget,
        "requests": args.requests,
        "repeats": args.repeats,
        "path": str(out),
    }
    runs = []
    for turn in range(args.repeats):
        for method, warm in rotated(CONFIGS, turn):
            payload = {"model": args.model, "method": method, "warm": warm, "tokens": args.tokens}
            payload |= {"budget": args.budget, "requests": args.requests}
            run = run_in_fresh_process("bench.first_request", payload)
            runs.append({"method": method, "warm": warm, "round": turn, **run})
            print(label(method, warm), [round(r["ttft_ms"]) for r in run["requests"]], file=sys.stderr)
    result["prompt_tokens"] = runs[0]["prompt_tokens"]
    result["runs"] = runs
    result["summary"] = summarize(runs)
    stamp_finish(result)
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    section = doc_section(result)
    if not args.no_doc:
        replace_doc_section(DOC_HEADING, section)
    print(section)


if __name__ == "__main__":
    main()
