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

Two allocator settings, because RSS is what the OS charges but not what is alive: with glibc's
defaults (``default``, as a server runs) a freed block under the adaptive mmap threshold stays in
the heap, so the peak depends on fragmentation as much as on live tensors (runs of one
configuration differed by 150 MiB). With ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (``fixed``)
every tensor-sized block is its own mapping, returned to the OS when freed, so RSS follows the
bytes alive.

    python -m bench.prefill_memory --lengths 4096 8000 --repeats 2
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
    grouped_bars,
    needle_prompt,
    replace_doc_section,
    report_result,
    result_header,
    run_in_fresh_process,
    stamp_finish,
    write_json,
)

logger = logging.getLogger(__name__)

DOC_HEADING = "## Prefill memory of the KV methods: pruning during the prefill (issue 14)"
AFTER_PREFILL = "-after-prefill"
CONFIGS = ["none", "snapkv", f"snapkv{AFTER_PREFILL}", "pyramidkv", "h2o", "streamingllm"]
MiB = 2**20
FIXED_MMAP_THRESHOLD = "131072"


def run_config(payload: dict[str, Any]) -> dict[str, Any]:
    from compressors.base import KVAttachment
    from compressors.kv_pruner import ScoredKVPruner
    from server.engine.hf import HFEngine
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
    from server.models import load_model

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
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for malloc, length in sorted({(r["malloc"], r["length"]) for r in runs}, reverse=True):
        same = [r for r in runs if r["length"] == length and r["malloc"] == malloc]
        none = [r["peak_rise_bytes"] for r in same if r["config"] == "none"]
        for config in CONFIGS:
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
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, fixed mmap threshold")
    parser.add_argument("--default-malloc-repeats", type=int, default=1, help="runs with glibc's defaults")
    parser.add_argument("--default-malloc-lengths", type=int, nargs="+", default=[8000])
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        report_result(run_config(json.loads(args.worker)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = {**result_header(args.model), "budget": args.budget, "runs": []}
    out_path = RESULTS_DIR / "prefill_memory_smollm2.json"
    plan = [("fixed", repeat, length) for repeat in range(args.repeats) for length in args.lengths]
    plan += [("default", r, n) for r in range(args.default_malloc_repeats) for n in args.default_malloc_lengths]
    for malloc, repeat, length in plan:
        order = CONFIGS[repeat % len(CONFIGS) :] + CONFIGS[: repeat % len(CONFIGS)]
        for config in order:
            payload = {"model": args.model, "config": config, "length": length, "budget": args.budget}
            run = run_worker({**payload, "seed": args.seed + repeat, "malloc": malloc})
            logger.info("%s %s %s: rise %.0f MiB", malloc, length, config, run["peak_rise_bytes"] / MiB)
            result["runs"].append(run)
            result["summary"] = summarise(result["runs"])
            write_json(out_path, result)
    stamp_finish(result)
    result["summary"] = summarise(result["runs"])
    write_json(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    if not args.no_doc:
        replace_doc_section(DOC_HEADING, markdown_section(result, out_path))
    print(markdown_section(result, out_path))
    return 0


def run_worker(payload: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process, under the payload's allocator setting."""
    saved = os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    if payload["malloc"] == "fixed":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = FIXED_MMAP_THRESHOLD
    try:
        return run_in_fresh_process("bench.prefill_memory", payload)
    finally:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
        if saved is not None:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["malloc"] == "fixed"]
    lengths = sorted({r["length"] for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    peaks = {(r["length"], r["config"]): r["peak_rise_mib_median"] for r in rows}
    grouped_bars(ax, lengths, CONFIGS, lambda n, config: peaks.get((n, config), 0))
    ax.set_ylabel("peak RSS rise over the request (MiB, median)\nmmap threshold fixed at 128 KiB")
    ax.set_title(f"Prefill peak memory, {result['model']}, budget {result['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    m = result["machine"]
    lines = [
        DOC_HEADING,
        "",
        f"Measured {result['started_at']} to {result.get('finished_at', '?')} with `python -m bench.prefill_memory` on "
        f"{m['cpu']} ({m['cpu_cores']} cores, torch {m['torch']}), {result['model']} {m['dtype']}, budget "
        f"{result['budget']}, one output token. Load average before/after: {result['loadavg_before']} / "
        f"{result.get('loadavg_after')}. Each run is a fresh process (model load, a 256-token warm-up of the same "
        "configuration, then the measured request); peak rise = process RSS sampled every 2 ms over the request "
        "minus the RSS at its start; the median of the runs; `snapkv-after-prefill` is the old path (the whole "
        "prompt's cache, pruned after the prefill). malloc `fixed`: `MALLOC_MMAP_THRESHOLD_=131072`, so freed "
        "tensors go back to the OS and RSS follows live bytes; `default`: glibc as a server runs it, where the "
        f"peak also depends on heap fragmentation. Data `bench/results/{out_path.name}`, plot "
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
