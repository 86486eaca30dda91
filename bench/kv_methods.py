"""KV-cache methods side by side: none, GemFilter, SnapKV, H2O, StreamingLLM, PyramidKV.

For every (prompt length, method, budget) configuration a fresh Python process loads the model,
warms up with one short request of the same method, then answers needle-in-a-haystack prompts
(contract/needles.py, one needle per depth, different seeds) greedily with ``ignore_eos`` and
``--max-tokens`` new tokens, so every request decodes the same number of tokens. The engine
measures each request itself (server/measure.py): TTFT, decode tokens/s (tokens after the first
over the time they took), KV-cache bytes right after prefill (+ pruning) from the cache tensors,
and peak memory (process RSS sampled every ``--rss-interval-ms`` on CPU). A needle counts as found when its
answer appears in the text generated before the first end-of-sequence token.

Writes ``bench/results/kv_methods_<model>.json`` after every configuration (a cut-short run keeps
what it measured), ``kv_methods_<model>.png``, and a table section in docs/benchmarks.md.

    python -m bench.kv_methods --lengths 2048 4096 8192 --budgets 256 1024
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import (
    RESULTS_DIR,
    WorkerError,
    figure,
    machine_description,
    model_slug,
    needle_prompt,
    replace_doc_section,
    report_result,
    run_in_fresh_process,
    write_json,
)

logger = logging.getLogger(__name__)

METHODS = ["none", "gemfilter", "snapkv", "h2o", "streamingllm", "pyramidkv"]
DOC_HEADING = "## KV-cache methods side by side (issue 7)"


# ---- worker: one configuration in its own process ------------------------------------------
def run_config(payload: dict[str, Any]) -> dict[str, Any]:
    import server.engine.hf as hf_engine
    from contract.needles import depths
    from server.engine.hf import HFEngine
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
    from server.measure import PeakMemoryMeter
    from server.models import load_model

    # The engine's RSS sampler wakes every 2 ms; on a heavily shared CPU each wake-up makes the
    # decode loop wait for the GIL a whole scheduler slice. A coarser interval (named in the
    # results' memory_source) keeps the sampler from dominating what it measures.
    interval_s = payload["rss_interval_ms"] / 1000.0
    hf_engine.PeakMemoryMeter = functools.partial(PeakMemoryMeter, interval_s=interval_s)  # type: ignore[misc]
    engine = HFEngine(load_model(payload["model"], device="cpu"))
    knobs = {} if payload["budget"] is None else {"budget": payload["budget"]}
    spec = CompressionSpec(payload["method"], knobs)
    sampling = SamplingParams(max_tokens=payload["max_tokens"], temperature=0.0, ignore_eos=True)
    warm = needle_prompt(engine, 600, 0.5, seed=999)
    engine.generate(GenerationRequest(warm.prompt_ids, SamplingParams(max_tokens=4, temperature=0.0), spec))
    runs = []
    for index, depth in enumerate(depths(payload["depths"])):
        prompt = needle_prompt(engine, payload["length"], depth, seed=payload["seed"] + index)
        result = engine.generate(GenerationRequest(prompt.prompt_ids, sampling, spec))
        answer = engine.decode(tokens_before_eos(result.token_ids, engine.eos_token_ids))
        metrics = result.metrics
        runs.append(
            {
                "depth": depth,
                "prompt_tokens": result.prompt_tokens,
                "kept_tokens": result.compression.kept_tokens,
                "found": prompt.case.needle.found_in(answer),
                "answer": answer.strip()[:120],
                "expected": prompt.case.needle.answer,
                "ttft_ms": metrics.ttft_ms,
                "prefill_ms": metrics.prefill_ms,
                "decode_tokens_per_s": metrics.output_tokens_per_s,
                "kv_bytes_after_prefill": metrics.kv_cache_bytes,
                "kv_bytes_before_pruning": result.compression.kv_bytes_before,
                "peak_memory_bytes": metrics.peak_memory_bytes,
                "memory_baseline_bytes": metrics.memory_baseline_bytes,
                "memory_source": metrics.memory_source,
                "generated_tokens": result.completion_tokens,
            }
        )
    return {**payload, "runs": runs}


def tokens_before_eos(token_ids: list[int], eos_ids: set[int]) -> list[int]:
    for index, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:index]
    return token_ids


# ---- driver ------------------------------------------------------------------------------
def summarise(config: dict[str, Any]) -> dict[str, Any]:
    runs = config["runs"]
    return {
        "length": config["length"],
        "method": config["method"],
        "budget": config["budget"],
        "prompt_tokens": round(median(r["prompt_tokens"] for r in runs)),
        "accuracy": sum(r["found"] for r in runs) / len(runs),
        "needles": len(runs),
        "ttft_ms": median(r["ttft_ms"] for r in runs),
        "decode_tokens_per_s": median(r["decode_tokens_per_s"] for r in runs),
        "kv_bytes_after_prefill": median(r["kv_bytes_after_prefill"] for r in runs),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "peak_over_baseline_bytes": max(r["peak_memory_bytes"] - r["memory_baseline_bytes"] for r in runs),
    }


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = []
    for length in args.lengths:
        depths = args.depths_8k if length >= 8192 else args.depths
        for method in args.methods:
            for budget in [None] if method == "none" else args.budgets:
                configs.append(
                    {
                        "model": args.model,
                        "length": length,
                        "method": method,
                        "budget": budget,
                        "depths": depths,
                        "max_tokens": args.max_tokens,
                        "seed": args.seed,
                        "rss_interval_ms": args.rss_interval_ms,
                    }
                )
    return configs


def config_key(config: dict[str, Any]) -> tuple[int, str, int | None]:
    return config["length"], config["method"], config["budget"]


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    out_path = RESULTS_DIR / f"kv_methods_{model_slug(args.model)}.json"
    data: dict[str, Any] = {
        "machine": machine_description(),
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "note": "CPU shared with other work while measuring: timings are noisy; compare within a length.",
        "configs": [],
        "summary": [],
    }
    if args.resume and out_path.is_file():
        data["configs"] = json.loads(out_path.read_text(encoding="utf-8"))["configs"]
        data["summary"] = [summarise(config) for config in data["configs"]]
    done = {config_key(config) for config in data["configs"]}
    for config in configurations(args):
        if config_key(config) in done:
            continue
        label = f"{config['length']} {config['method']} budget={config['budget']}"
        started = time.perf_counter()
        try:
            result = run_in_fresh_process("bench.kv_methods", config, timeout_s=args.config_timeout_s)
        except (WorkerError, TimeoutError) as exc:
            logger.error("%s failed: %s", label, exc)
            continue
        data["configs"].append(result)
        data["summary"].append(summarise(result))
        data["machine"]["loadavg_1_5_15"] = machine_description()["loadavg_1_5_15"]
        write_json(out_path, data)
        print(f"{label}: {summarise(result)} ({time.perf_counter() - started:.0f} s)", flush=True)
    return data


def plot(data: dict[str, Any], path: Path) -> None:
    panels = [
        ("accuracy", "needle accuracy"),
        ("ttft_ms", "TTFT (ms)"),
        ("decode_tokens_per_s", "decode tokens/s"),
        ("kv_bytes_after_prefill", "KV MiB after prefill"),
    ]
    with figure(path, 1, len(panels), figsize=(5 * len(panels), 4)) as (_fig, axes):
        series: dict[str, list[dict[str, Any]]] = {}
        for row in data["summary"]:
            name = row["method"] if row["budget"] is None else f"{row['method']}-{row['budget']}"
            series.setdefault(name, []).append(row)
        for ax, (key, title) in zip(axes, panels, strict=True):
            for name, rows in sorted(series.items()):
                rows = sorted(rows, key=lambda r: r["length"])
                values = [r[key] / 2**20 if key == "kv_bytes_after_prefill" else r[key] for r in rows]
                ax.plot([r["length"] for r in rows], values, marker="o", label=name)
            ax.set_title(title)
            ax.set_xlabel("prompt tokens")
            ax.set_xscale("log", base=2)
        axes[0].legend(fontsize=7)


def markdown_table(data: dict[str, Any]) -> str:
    machine = data["machine"]
    lines = [
        DOC_HEADING,
        "",
        f"Measured by `python -m bench.kv_methods` on {machine['cpu']} ({machine['cpu_cores']} cores, "
        f"torch {machine['torch']}, {machine['torch_threads']} threads), SmolLM2-135M-Instruct fp32, greedy, "
        f"{data['settings']['max_tokens']} new tokens with ignore_eos. The CPU was shared with other work "
        f"(load average {machine['loadavg_1_5_15']} at the end), so timings are noisy: compare rows of one "
        "length. KV = exact bytes of the cache tensors after prefill (+ pruning); peak = process RSS peak "
        f"sampled every {data['settings'].get('rss_interval_ms', 2):g} ms over the request, above the RSS at its "
        "start. Accuracy = needles found / asked.",
        "",
        "| prompt | method | budget | acc | needles | TTFT s | decode tok/s | KV MiB | KV / full | peak +MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    full_kv = {r["length"]: r["kv_bytes_after_prefill"] for r in data["summary"] if r["method"] == "none"}
    for r in sorted(data["summary"], key=lambda r: (r["length"], METHODS.index(r["method"]), r["budget"] or 0)):
        full = full_kv.get(r["length"])
        share = f"{r['kv_bytes_after_prefill'] / full:.3f}" if full else "-"
        lines.append(
            f"| {r['prompt_tokens']} | {r['method']} | {r['budget'] or '-'} | {r['accuracy']:.2f} | {r['needles']} "
            f"| {r['ttft_ms'] / 1000:.1f} | {r['decode_tokens_per_s']:.1f} | {r['kv_bytes_after_prefill'] / 2**20:.1f} "
            f"| {share} | {r['peak_over_baseline_bytes'] / 2**20:.0f} |"
        )
    lines += ["", f"Data: `bench/results/kv_methods_{model_slug(data['settings']['model'])}.json`, plot: `.png`.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--depths", type=int, default=5, help="needle depths per config below 8K")
    parser.add_argument("--depths-8k", type=int, default=3, help="needle depths per config at 8K and above")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rss-interval-ms", type=float, default=20.0, help="peak-RSS sampling interval")
    parser.add_argument("--config-timeout-s", type=float, default=1800)
    parser.add_argument("--resume", action="store_true", help="keep configs already in the JSON, run the rest")
    parser.add_argument("--docs-only", action="store_true", help="re-render PNG + docs from the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        report_result(run_config(json.loads(args.worker)))
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    out_json = RESULTS_DIR / f"kv_methods_{model_slug(args.model)}.json"
    data = json.loads(out_json.read_text(encoding="utf-8")) if args.docs_only else run_all(args)
    plot(data, out_json.with_suffix(".png"))
    replace_doc_section(DOC_HEADING, markdown_table(data))


if __name__ == "__main__":
    main()
