"""Prefill benchmark: full attention vs GemFilter on needle prompts of 1K-8K tokens.

For every (prompt length, method) configuration a fresh Python process loads the model, warms
up with one short request of the same method, then answers needle-in-a-haystack prompts at
``--depths`` evenly spread depths (greedy). Each request is measured by the engine itself
(server/measure.py): TTFT, select time, prefill time, KV-cache bytes after prefill (exact, from
the cache tensors), and peak memory (process RSS sampled every 2 ms on CPU). The depths double
as timing repeats: timings are the median over them. A fresh process per configuration keeps
memory that glibc retained from an earlier configuration out of the next one's peak.

Writes ``bench/results/prefill_<model>.json`` (after every configuration, so a cut-short run
keeps what it measured), a PNG, and the table in docs/benchmarks.md.

    python -m bench.prefill            # or: gemserve bench, make bench
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from tqdm import tqdm

from bench.common import (
    DOCS_PATH,
    RESULTS_DIR,
    cpu_was_shared,
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

DEFAULT_LENGTHS = [1024, 2048, 4096, 8192]
# (label, method, budget): the configurations.
CONFIGS: list[tuple[str, str, int | None]] = [
    ("none", "none", None),
    ("gemfilter-256", "gemfilter", 256),
    ("gemfilter-1024", "gemfilter", 1024),
]
DOC_PATH = DOCS_PATH
DOC_HEADING = "## GemFilter prefill (issue 2)"


# ---- worker: one configuration in its own process ------------------------------------------
def run_config(payload: dict[str, Any]) -> dict[str, Any]:
    """Load the model, warm up, answer the needle prompts; per-request measurements."""
    from contract.needles import depths
    from server.engine.hf import HFEngine
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
    from server.models import load_model

    dtype = payload.get("dtype", "auto")
    engine = HFEngine(load_model(payload["model"], device="cpu", dtype=dtype, filter_dtype=dtype))
    knobs = {"budget": payload["budget"]} if payload["budget"] else {}
    spec = CompressionSpec(method=payload["method"], knobs=knobs)
    sampling = SamplingParams(max_tokens=payload["max_tokens"], temperature=0.0)
    target = fitting_target(engine, payload["tokens"], payload["max_tokens"])

    def answer(prompt_ids: list[int]) -> Any:
        request = GenerationRequest(prompt_ids=prompt_ids, sampling=sampling, compression=spec)
        return engine.generate(request)

    warm = needle_prompt(engine, min(512, target), depth=0.5, seed=payload["seed"] - 1)
    answer(warm.prompt_ids)
    requests = []
    for i, depth in enumerate(depths(payload["depths"])):
        prompt = needle_prompt(engine, target, depth=depth, seed=payload["seed"] + i)
        result = answer(prompt.prompt_ids)
        m = result.metrics
        requests.append(
            {
                "depth": round(depth, 4),
                "seed": payload["seed"] + i,
                "prompt_tokens": result.prompt_tokens,
                "kept_tokens": result.compression.kept_tokens,
                "layer": result.compression.layer,
                "ttft_ms": round(m.ttft_ms, 1),
                "select_ms": round(m.select_ms, 1),
                "prefill_ms": round(m.prefill_ms, 1),
                "kv_cache_bytes": m.kv_cache_bytes,
                "peak_memory_bytes": m.peak_memory_bytes,
                "memory_baseline_bytes": m.memory_baseline_bytes,
                "memory_source": m.memory_source,
                "answer": prompt.case.needle.answer,
                "output": result.text,
                "found": prompt.case.needle.found_in(result.text),
            }
        )
    return {"target_tokens": target, "requests": requests, "dtype": engine.dtype}


def fitting_target(engine: Any, tokens: int, max_tokens: int) -> int:
    """Shrink the user-message target so chat template + prompt + max_tokens fit the context."""
    overhead = len(engine.encode_chat([{"role": "user", "content": "x"}])) - len(engine.encode_prompt("x"))
    return min(tokens, engine.max_model_len - max_tokens - overhead - 8)


# ---- driver -----------------------------------------------------------------------------------
def summarise(label: str, method: str, budget: int | None, tokens: int, worker: dict[str, Any]) -> dict[str, Any]:
    reqs = worker["requests"]
    first = reqs[0]
    return {
        "label": label,
        "method": method,
        "budget": budget,
        "length": tokens,
        "target_tokens": worker["target_tokens"],
        "prompt_tokens": round(median(r["prompt_tokens"] for r in reqs)),
        "kept_tokens": round(median(r["kept_tokens"] for r in reqs)),
        "layer": first["layer"],
        "ttft_ms": median(r["ttft_ms"] for r in reqs),
        "select_ms": median(r["select_ms"] for r in reqs),
        "prefill_ms": median(r["prefill_ms"] for r in reqs),
        "kv_cache_bytes": round(median(r["kv_cache_bytes"] for r in reqs)),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in reqs),
        "peak_memory_over_baseline_bytes": first["peak_memory_bytes"] - first["memory_baseline_bytes"],
        "memory_source": first["memory_source"],
        "accuracy": sum(r["found"] for r in reqs) / len(reqs),
        "cases": len(reqs),
        "requests": reqs,
    }


def targets(rows: list[dict[str, Any]], num_layers: int) -> list[dict[str, Any]]:
    """The issue's targets per length: TTFT ratio vs the (r+1)/L + prefill(k) bound, KV ratio,
    accuracy."""
    by = {(r["length"], r["label"]): r for r in rows}
    none_1k = by.get((1024, "none"))
    out = []
    for length in sorted({r["length"] for r in rows}):
        none, gem = by.get((length, "none")), by.get((length, "gemfilter-1024"))
        if not none or not gem:
            continue
        entry: dict[str, Any] = {
            "length": length,
            "ttft_ratio": round(gem["ttft_ms"] / none["ttft_ms"], 3),
            "kv_ratio": round(gem["kv_cache_bytes"] / none["kv_cache_bytes"], 4),
            "kept_ratio": round(gem["kept_tokens"] / none["prompt_tokens"], 4),
            "accuracy_none": none["accuracy"],
            "accuracy_gemfilter_1024": gem["accuracy"],
        }
        if gem["layer"] is not None:
            filter_share = (gem["layer"] + 1) / num_layers
            entry["bound_filter_share"] = round(filter_share, 3)
            if none_1k:  # the prefill of k=1024 kept tokens, as measured for `none` at 1K
                entry["bound_with_prefill_k"] = round(filter_share + none_1k["ttft_ms"] / none["ttft_ms"], 3)
        out.append(entry)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["rows"]
    with figure(path, 2, 2, figsize=(11, 7.5)) as (fig, axes):
        panels = [
            ("ttft_ms", "TTFT (ms, median)", 1.0),
            ("kv_cache_bytes", "KV cache after prefill (MiB)", 1 / 2**20),
            ("peak_memory_bytes", "peak RSS (MiB)", 1 / 2**20),
            ("accuracy", "needle accuracy", 1.0),
        ]
        for ax, (key, title, scale) in zip(axes.flat, panels, strict=True):
            for label, _, _ in CONFIGS:
                points = sorted((r["length"], r[key] * scale) for r in rows if r["label"] == label)
                if points:
                    ax.plot(*zip(*points, strict=True), "-o", label=label, markersize=4)
            ax.set_title(title)
            ax.set_xlabel("prompt tokens")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes.flat[3].set_ylim(-0.05, 1.05)
        axes.flat[0].legend()
        fig.suptitle(f"GemFilter vs full attention, {result['model']}, {result['machine']['cpu_cores']}-core CPU")


def markdown_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = sorted(result["rows"], key=lambda r: (r["length"], [c[0] for c in CONFIGS].index(r["label"])))
    lines = [
        DOC_HEADING,
        "",
        f"Measured {result['finished_at']} with `python -m bench.prefill` (`gemserve bench`); raw numbers in "
        f"`bench/results/{result['json_name']}`, plot `bench/results/{Path(result['json_name']).stem}.png`.",
        f"Model {result['model']} ({result['num_layers']} layers), CPU {result['machine']['dtype']}, greedy, "
        f"{result['max_tokens']} "
        f"max new tokens. Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gib']} GiB RAM, torch "
        f"{m['torch']}, transformers {m['transformers']}, Python {m['python']}.",
        f"Load average before/after the run: {result['loadavg_before']} / {m['loadavg_1_5_15']} "
        "(1/5/15 min) on 2 cores: "
        + (
            "**the CPU was shared with other work**, so absolute times are inflated and noisy; ratios measured "
            "in the same run are the meaningful figures."
            if cpu_was_shared(result["loadavg_before"])
            else "nothing else was running (the 1-minute load at the end is the benchmark's own 2 threads)."
        ),
        "",
        "Each row is one fresh process: model load, one ~512-token warm-up request, then one needle prompt per "
        f"depth ({result['depths']} depths from 0 to 1; {result.get('long_depths', result['depths'])} above 4K "
        "tokens). Times are medians over those requests; TTFT = request "
        "created -> first token chosen (select + prefill + first sampling). Peak memory is the max sampled "
        "process RSS (`memory_source` in the JSON) including the ~model weights; `+req` is peak minus the RSS "
        "just before the first measured request. KV bytes are exact, from the cache tensors after prefill.",
        "",
        "| tokens | method | kept | TTFT ms | select ms | prefill ms | KV MiB | peak RSS MiB (+req) | needle acc |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt_tokens']} | {method_label(r)} "
            f"| {r['kept_tokens']} | {r['ttft_ms']:.0f} | {r['select_ms']:.0f} "
            f"| {r['prefill_ms']:.0f} | {r['kv_cache_bytes'] / 2**20:.1f} | {r['peak_memory_bytes'] / 2**20:.0f} "
            f"(+{r['peak_memory_over_baseline_bytes'] / 2**20:.0f}) | {sum(q['found'] for q in r['requests'])}"
            f"/{r['cases']} |"
        )
    lines += [
        "",
        "Targets (issue 2), gemfilter k=1024 against none at the same length. Bound = the paper's "
        "(r+1)/L filter share, and that plus the measured TTFT of `none` at 1K over `none` at this length "
        "(the prefill of the k kept tokens):",
        "",
        "| tokens | TTFT ratio (target ≤ 0.65 at 8K) | bound (r+1)/L | bound + prefill(k) | KV ratio | kept/total "
        "| acc none | acc gemfilter-1024 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in result["targets"]:
        lines.append(
            f"| {t['length']} | {t['ttft_ratio']:.3f} | {t.get('bound_filter_share', '-')} "
            f"| {t.get('bound_with_prefill_k', '-')} | {t['kv_ratio']:.4f} | {t['kept_ratio']:.4f} "
            f"| {t['accuracy_none']:.2f} | {t['accuracy_gemfilter_1024']:.2f} |"
        )
    notes = [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines + (["", "Notes:", "", *notes] if notes else []) + calibration_lines()) + "\n"


def method_label(row: dict[str, Any]) -> str:
    return row["label"] if row["layer"] is None else f"{row['label']} (r={row['layer']})"


def calibration_lines(path: Path = RESULTS_DIR / "filter_layer_smollm2.json") -> list[str]:
    """The filter-layer calibration behind the default layer, when its result is present."""
    if not path.is_file():
        return []
    cal = json.loads(path.read_text(encoding="utf-8"))
    main = cal["lengths"][0]
    recall = main["mean_recall"]["answer@512"]
    lines = [
        "",
        f"Filter layer (an earlier calibration; `gemserve calibrate` now writes the model's profile, docs/eval.md) "
        f"measured GemFilter's needle recall "
        f"(answer tokens kept in the top-k after pooling and the protected tail) at every layer over "
        f"{len(main['cases'])} needles at ~{main['target_tokens']} tokens"
        + ("" if cal.get("complete") else " (run cut short: partial result)")
        + f"; rule: {cal['rule']} -> layer {cal['chosen_layer']}. Data `bench/results/{path.name}`, plot "
        f"`bench/results/{path.stem}.png`.",
        "",
        "| layer | " + " | ".join(str(i) for i in range(len(recall))) + " |",
        "|---|" + "---:|" * len(recall),
        "| answer recall@512 | " + " | ".join(f"{v:.2f}" for v in recall) + " |",
        "| answer recall@256 | " + " | ".join(f"{v:.2f}" for v in main["mean_recall"]["answer@256"]) + " |",
    ]
    chosen = cal["chosen_layer"]
    by_depth = ", ".join(
        f"{case['depth']:.2f}: {case['recall']['answer@512'][chosen]:.2f}"
        for case in sorted(main["cases"], key=lambda case: case["depth"])
    )
    lines.append(f"\nPer needle at layer {chosen}, depth: answer recall@512 -> {by_depth}.")
    for check in cal["lengths"][1:]:
        values = check["mean_recall"]["answer@512"]
        if chosen < len(values):
            lines.append(
                f"\nAt ~{check['target_tokens']} tokens ({len(check['cases'])} needles) layer {chosen}: answer "
                f"recall@512 {values[chosen]:.2f}, @256 {check['mean_recall']['answer@256'][chosen]:.2f}."
            )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, .gguf file or HF model dir")
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS, help="prompt lengths in tokens")
    parser.add_argument(
        "--methods", nargs="+", default=[c[0] for c in CONFIGS], help="none gemfilter-256 gemfilter-1024"
    )
    parser.add_argument("--depths", type=int, default=5, help="needle depths per configuration (default 5)")
    parser.add_argument(
        "--long-depths", type=int, help="needle depths for lengths above 4096 (default: --depths; fewer saves time)"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--dtype",
        default="auto",
        help="the model's and the filter pass's dtype: auto (server/precision.py) | bfloat16 | float16 | float32",
    )
    parser.add_argument("--seed", type=int, default=500)
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/prefill_<model>.json)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="measure nothing: combine saved runs (rows pooled) into --out, redraw the plot and the doc table",
    )
    parser.add_argument("--note", action="append", default=[], help="with --from-json: a note for the doc section")


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        out = args.out or RESULTS_DIR / f"prefill_{model_slug(args.model)}.json"
        result = combine_runs(args.from_json)
        result["notes"] = [*result.get("notes", []), *args.note]
        write_json(out, result)
        plot(result, out.with_suffix(".png"))
        replace_doc_section(DOC_HEADING, markdown_section(result))
        print(f"wrote {out}, {out.with_suffix('.png')} and {DOC_PATH} from {len(args.from_json)} saved run(s)")
        return 0
    configs = [c for c in CONFIGS if c[0] in args.methods]
    unknown = sorted(set(args.methods) - {c[0] for c in CONFIGS})
    if unknown:
        raise ValueError(f"unknown benchmark method {unknown}; choose from {[c[0] for c in CONFIGS]}")
    out = args.out or RESULTS_DIR / f"prefill_{model_slug(args.model)}.json"
    result: dict[str, Any] = {
        "model": args.model,
        "json_name": out.name,
        "max_tokens": args.max_tokens,
        "depths": args.depths,
        "long_depths": args.long_depths or args.depths,
        "loadavg_before": machine_description()["loadavg_1_5_15"],
        "rows": [],
    }
    result["num_layers"] = model_layers(args.model)
    jobs = [(tokens, c) for tokens in args.lengths for c in configs]
    with tqdm(jobs, desc="bench", unit="config") as progress:
        for tokens, (label, method, budget) in progress:
            progress.set_postfix_str(f"{tokens} tokens, {label}")
            payload = {
                "model": args.model,
                "method": method,
                "budget": budget,
                "tokens": tokens,
                "max_tokens": args.max_tokens,
                "depths": args.long_depths if args.long_depths and tokens > 4096 else args.depths,
                "seed": args.seed + tokens,  # the same needles for every method at a length
                "dtype": args.dtype,
            }
            worker = run_in_fresh_process("bench.prefill", payload)
            result["dtype"] = worker["dtype"]
            result["rows"].append(summarise(label, method, budget, tokens, worker))
            finish(result, out, write_doc=False)
    finish(result, out, write_doc=not args.no_doc)
    for t in result["targets"]:
        print(json.dumps(t))
    print(f"wrote {out}, {out.with_suffix('.png')}" + ("" if args.no_doc else f" and {DOC_PATH}"))
    return 0


def combine_runs(paths: list[Path]) -> dict[str, Any]:
    """Pool the rows of runs made separately (e.g. configurations run in parallel processes)."""
    runs = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    result = {**runs[0], "rows": [row for run in runs for row in run["rows"]]}
    result["combined_from"] = [str(path) for path in paths]
    result["loadavg_before"] = max((run["loadavg_before"] for run in runs), key=lambda load: load[0])
    result["targets"] = targets(result["rows"], result["num_layers"])
    return result


def finish(result: dict[str, Any], out: Path, write_doc: bool) -> None:
    result["machine"] = machine_description(result.get("dtype"))
    result["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["targets"] = targets(result["rows"], result["num_layers"])
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    if write_doc:
        replace_doc_section(DOC_HEADING, markdown_section(result))


def model_layers(model: str) -> int:
    from transformers import AutoConfig

    from server.models import resolve_model_dir

    _, source = resolve_model_dir(model)
    return int(AutoConfig.from_pretrained(source).get_text_config().num_hidden_layers)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        report_result(run_config(json.loads(argv[1])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
