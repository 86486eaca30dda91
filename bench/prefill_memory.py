"""Prefill peak memory of the KV methods: pruning each layer during the prefill vs after it.

Issue 14's target: the peak RSS rise of ``snapkv`` at budget 1024 on a ~8K-token prompt is at most
half of ``none``'s. Each measurement runs in a fresh Python process (RSS only grows within a
process, so a second request would start from the first one's high-water mark): load the model,
warm up with one 256-token request of the same configuration, then one needle prompt of the
target length with one output token. The engine measures the request itself (server/measure.py):
process RSS sampled every 2 ms over the request, minus the RSS when it started; the cache bytes
are exact (the tensors). ``snapkv-after-prefill`` is the old path, kept as the reference: the
whole prompt's cache first, pruned once the prefill is over (``KVAttachment``). Configurations
are interleaved (each repeat runs every configuration once, in a rotated order).

Allocator settings, because RSS is what the OS charges but not what is alive: with glibc's
adaptive mmap threshold (``glibc``) a freed block under the threshold stays in the heap, so the
peak depends on fragmentation as much as on live tensors (float32 runs of one configuration
differed by 150 MiB). ``server`` is what ``gemserve serve`` runs with (server/allocator.py: the
threshold at 128 KiB in a forward of 4K+ prompt tokens, so every tensor-sized block of it is its own
mapping, returned to the OS when freed, and RSS follows the bytes alive); ``32m`` what its other
steps run with, for every step. Per repeat and length the settings alternate (rotated), so their
prefill times compare run against neighbouring run.

    python -m bench.prefill_memory --lengths 4096 8000 --repeats 2
    python -m bench.prefill_memory --lengths 8000 --configs none,snapkv --tag allocator   # issue 24
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import (
    RESULTS_DIR,
    figure,
    grouped_bars,
    needle_prompt,
    replace_doc_section,
    report_result,
    result_header,
    rotated,
    run_in_fresh_process,
    stamp_finish,
    write_json,
)

logger = logging.getLogger(__name__)

DOC_HEADING = "## Prefill memory of the KV methods: pruning during the prefill (issue 14)"
AFTER_PREFILL = "-after-prefill"
CONFIGS = ["none", "snapkv", f"snapkv{AFTER_PREFILL}", "pyramidkv", "h2o", "streamingllm"]
MiB = 2**20
MALLOCS = ("server", "glibc", "32m")  # see the module doc


def run_config(payload: dict[str, Any]) -> dict[str, Any]:
    from compressors.base import KVAttachment
    from compressors.kv_pruner import ScoredKVPruner
    from server.allocator import STEP_MMAP_THRESHOLD, configure_heap
    from server.engine.hf import HFEngine
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
    from server.models import load_model
    from server.settings import Settings

    # Before any tensor exists, as `gemserve serve` does; "glibc": its adaptive threshold.
    thresholds = {"server": Settings().malloc_mmap_threshold, "glibc": 0, "32m": STEP_MMAP_THRESHOLD}
    heap = configure_heap(thresholds[payload["malloc"]])
    name = payload["config"]
    if name.endswith(AFTER_PREFILL):  # the reference: prune the full cache once the prefill is done
        ScoredKVPruner.kv_attachment = lambda self, target: KVAttachment(self, target)  # type: ignore[method-assign]
        name = name.removesuffix(AFTER_PREFILL)
    engine = HFEngine(load_model(payload["model"], device="cpu"))
    spec = CompressionSpec(name, {} if name == "none" else {"budget": payload["budget"]})
    sampling = SamplingParams(max_tokens=1, temperature=0.0)
    warm = needle_prompt(engine, 256, 0.5, seed=999)
    engine.generate(GenerationRequest(warm.prompt_ids, sampling, CompressionSpec(name)))
    prompt = needle_prompt(engine, payload["length"], 0.5, seed=payload["seed"])
    result = engine.generate(GenerationRequest(prompt.prompt_ids, sampling, spec))
    metrics, compression = result.metrics, result.compression
    return {
        **payload,
        "prompt_tokens": result.prompt_tokens,
        "peak_rise_bytes": metrics.peak_memory_bytes - metrics.memory_baseline_bytes,
        "baseline_bytes": metrics.memory_baseline_bytes,
        "kv_bytes_full": compression.kv_bytes_before or metrics.kv_cache_bytes,
        "kv_bytes_after": metrics.kv_cache_bytes,
        "prefill_ms": metrics.prefill_ms,
        "memory_source": metrics.memory_source,
        "heap": heap,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for malloc, length in sorted({(r["malloc"], r["length"]) for r in runs}, reverse=True):
        same = [r for r in runs if r["length"] == length and r["malloc"] == malloc]
        none = [r["peak_rise_bytes"] for r in same if r["config"] == "none"]
        for config in CONFIGS:  # the order of the table; a run may cover fewer
            mine = [r for r in same if r["config"] == config]
            if not mine:
                continue
            rise = median(r["peak_rise_bytes"] for r in mine)
            rows.append(
                {
                    "malloc": malloc,
                    "length": length,
                    "config": config,
                    "prompt_tokens": mine[0]["prompt_tokens"],
                    "runs": len(mine),
                    "peak_rise_mib_median": rise / MiB,
                    "peak_rise_mib_all": [round(r["peak_rise_bytes"] / MiB, 1) for r in mine],
                    "rise_vs_none": rise / median(none) if none else None,
                    "kv_mib_full": mine[0]["kv_bytes_full"] / MiB,
                    "kv_mib_after": mine[0]["kv_bytes_after"] / MiB,
                    "prefill_ms_median": median(r["prefill_ms"] for r in mine),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration and allocator setting")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=CONFIGS, help=f"of {','.join(CONFIGS)}")
    parser.add_argument("--mallocs", type=lambda s: s.split(","), default=list(MALLOCS), help=",".join(MALLOCS))
    parser.add_argument("--tag", help="a run of its own: its own JSON and docs section (e.g. allocator)")
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        report_result(run_config(json.loads(args.worker)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    unknown = sorted(set(args.configs) - set(CONFIGS)) + sorted(set(args.mallocs) - set(MALLOCS))
    if unknown:
        parser.error(f"unknown configuration or allocator setting: {', '.join(unknown)}")
    result = {**result_header(args.model), "budget": args.budget, "runs": []}
    out_path = RESULTS_DIR / f"prefill_memory_smollm2{f'_{args.tag}' if args.tag else ''}.json"
    heading = f"{DOC_HEADING} — {args.tag}" if args.tag else DOC_HEADING
    for repeat in range(args.repeats):
        for length in args.lengths:
            for malloc in rotated(args.mallocs, repeat):
                for config in rotated(args.configs, repeat):
                    payload = {"model": args.model, "config": config, "length": length, "budget": args.budget}
                    run = run_worker({**payload, "seed": args.seed + repeat, "malloc": malloc})
                    logger.info(
                        "%s %s %s: rise %.0f MiB, prefill %.0f ms",
                        malloc,
                        length,
                        config,
                        run["peak_rise_bytes"] / MiB,
                        run["prefill_ms"],
                    )
                    result["runs"].append(run)
            result["summary"] = summarise(result["runs"])
            write_json(out_path, result)
    stamp_finish(result)
    result["summary"] = summarise(result["runs"])
    write_json(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    if not args.no_doc:
        replace_doc_section(heading, markdown_section(result, out_path, heading))
    print(markdown_section(result, out_path, heading))
    return 0


def run_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process; the worker sets its allocator as the payload says (an
    operator's ``MALLOC_MMAP_THRESHOLD_`` would override both settings, so the worker never sees one)."""
    saved = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    try:
        return run_in_fresh_process("bench.prefill_memory", payload)
    finally:
        if saved is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def plot(result: dict[str, Any], path: Path) -> None:
    rows = [r for r in result["summary"] if r["malloc"] == "server"]
    lengths = sorted({r["length"] for r in rows})
    with figure(path, figsize=(9, 4.5)) as (_fig, ax):
        peaks = {(r["length"], r["config"]): r["peak_rise_mib_median"] for r in rows}
        configs = [config for config in CONFIGS if any(r["config"] == config for r in rows)]
        grouped_bars(ax, lengths, configs, lambda n, config: peaks.get((n, config), 0))
        ax.set_ylabel("peak RSS rise over the request (MiB, median)\nthe server's allocator setting")
        ax.set_title(f"Prefill peak memory, {result['model']}, budget {result['budget']}")


def markdown_section(result: dict[str, Any], out_path: Path, heading: str = DOC_HEADING) -> str:
    m = result["machine"]
    lines = [
        heading,
        "",
        f"Measured {result['started_at']} to {result.get('finished_at', '?')} with `python -m bench.prefill_memory` on "
        f"{m['cpu']} ({m['cpu_cores']} cores, torch {m['torch']}), {result['model']} {m['dtype']}, budget "
        f"{result['budget']}, one output token. Load average before/after: {result['loadavg_before']} / "
        f"{result.get('loadavg_after')}. Each run is a fresh process (model load, a 256-token warm-up of the same "
        "configuration, then the measured request); peak rise = process RSS sampled every 2 ms over the request "
        "minus the RSS at its start; the median of the runs; `snapkv-after-prefill` is the old path (the whole "
        "prompt's cache, pruned after the prefill). malloc `server`: what `gemserve serve` sets (server/allocator.py: "
        "glibc's mmap threshold at 128 KiB in forwards of 4K+ prompt tokens, so freed tensors go back to the OS and "
        "RSS follows live bytes); `32m`: the threshold of its other steps, here for every step; `glibc`: its "
        "adaptive threshold. Under both the peak also depends on heap fragmentation. Prefill ms: the settings "
        "alternate per repeat (rotated), so compare them row against row. "
        f"Data `bench/results/{out_path.name}`, plot "
        f"`bench/results/{out_path.with_suffix('.png').name}`.",
        "",
        "| malloc | tokens | method | peak RSS rise MiB (runs) | vs none | KV MiB full -> kept | prefill ms |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in result["summary"]:
        ratio = "" if r["rise_vs_none"] is None else f"{r['rise_vs_none']:.2f}"
        kv = f"{r['kv_mib_full']:.0f} -> {r['kv_mib_after']:.0f}"
        runs = ", ".join(f"{v:.0f}" for v in r["peak_rise_mib_all"])
        lines.append(
            f"| {r['malloc']} | {r['prompt_tokens']} | {r['config']} | {r['peak_rise_mib_median']:.0f} ({runs}) | "
            f"{ratio} | {kv} | {r['prefill_ms_median']:.0f} |"
        )
    costs = allocator_costs(result["runs"])
    if costs:
        lines += [
            "",
            "Prefill time with each setting over glibc's, per repeat (same prompt, adjacent runs):",
            "",
        ]
        lines += [
            f"- {malloc}, {length} tokens, {config}: {', '.join(f'{c:.3f}' for c in ratios)}"
            for (malloc, length, config), ratios in costs.items()
        ]
    return "\n".join(lines) + "\n"


def allocator_costs(runs: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[float]]:
    """(malloc, length, config) -> prefill ms under that setting / under ``glibc``, one ratio per repeat."""
    by_key = {(r["length"], r["config"], r["seed"], r["malloc"]): r["prefill_ms"] for r in runs}
    costs: dict[tuple[str, int, str], list[float]] = {}
    for length, config, seed, malloc in sorted(by_key):
        if malloc != "glibc" and (length, config, seed, "glibc") in by_key:
            glibc = by_key[length, config, seed, "glibc"]
            costs.setdefault((malloc, length, config), []).append(by_key[length, config, seed, malloc] / glibc)
    return costs


if __name__ == "__main__":
    sys.exit(main())
