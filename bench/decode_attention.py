"""A decode step's attention on the CPU in bfloat16: torch's SDPA against float32 math by hand.

torch's CPU SDPA runs one bfloat16 query through its flash kernel's padded query blocks, several
times slower than three float32 ops (compressors/probe.py, ``decode_attention_float32``). Two
measurements, in one process, the two paths interleaved (A, B, A, B ...) so drift hits both alike:

1. ``kernel``: one layer's attention (SmolLM2's 9 query / 3 KV heads, d=64) over caches of 576 to
   32K entries: median microseconds per call;
2. ``engine``: SmolLM2-135M through ``HFEngine.generate`` on needle prompts of 1K-8K tokens, 32
   output tokens, ``none``: the median inter-token latency (server-side ``itl_p50_ms``) and the
   decode time, with the hand path switched off (torch's SDPA) and on; whether the 32 tokens are
   the same, whether each found the needle, and how many tokens each shares with the float32
   model's greedy output (bfloat16 greedy outputs part ways on tiny differences: which path stays
   closer to float32 says which rounds less).

Writes ``bench/results/decode_attention.json`` + PNG and a table in docs/benchmarks.md.

    python -m bench.decode_attention [--lengths 1024 4096 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    figure,
    needle_prompt,
    replace_doc_section,
    result_header,
    stamp_finish,
    write_json,
)

DOC_HEADING = "## A decode step's attention in bfloat16 on the CPU"
CACHE_LENGTHS = [576, 2048, 8192, 32768]


@contextmanager
def torch_sdpa_for_decode(on: bool):
    """With ``on``, the probe's SDPA sends bfloat16 decode steps to torch's SDPA as before."""
    import compressors.probe as probe

    original = probe.is_cpu_half_decode
    if on:
        probe.is_cpu_half_decode = lambda query, mask: False
    try:
        yield
    finally:
        probe.is_cpu_half_decode = original


def kernel_times(repeats: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from compressors.probe import decode_attention_float32

    rows = []
    for n in CACHE_LENGTHS:
        query = torch.randn(1, 9, 1, 64).to(torch.bfloat16)
        key, value = (torch.randn(1, 3, n, 64).to(torch.bfloat16) for _ in range(2))
        states = (query, key, value)
        paths = {
            "torch_sdpa": lambda states=states: F.scaled_dot_product_attention(*states, enable_gqa=True),
            "float32_by_hand": lambda states=states: decode_attention_float32(*states, None, None),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, run in paths.items():
                start = time.perf_counter()
                for _ in range(20):
                    run()
                times[name].append((time.perf_counter() - start) / 20 * 1e6)
        row = {"cache_entries": n, **{f"{name}_us": statistics.median(t) for name, t in times.items()}}
        row["speedup"] = row["torch_sdpa_us"] / row["float32_by_hand_us"]
        rows.append(row)
    return rows


def engine_times(lengths: list[int], prompts: int, max_tokens: int) -> list[dict[str, Any]]:
    from server.engine.hf import HFEngine
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
    from server.models import load_model

    engine = HFEngine(load_model("smollm2-135m-instruct", device="cpu", dtype="bfloat16", filter_dtype="bfloat16"))
    reference = HFEngine(load_model("smollm2-135m-instruct", device="cpu", dtype="float32", filter_dtype="float32"))
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for length in lengths:
        for seed in range(prompts):
            prompt = needle_prompt(engine, length, depth=0.5, seed=900 + seed)
            ids = prompt.prompt_ids
            float32 = reference.generate(GenerationRequest(list(ids), sampling, CompressionSpec("none", {}))).token_ids
            outputs = {}
            order = [True, False] if seed % 2 == 0 else [False, True]
            for torch_path in order:
                with torch_sdpa_for_decode(torch_path):
                    request = GenerationRequest(list(ids), sampling, CompressionSpec("none", {}))
                    result = engine.generate(request)
                name = "torch_sdpa" if torch_path else "float32_by_hand"
                outputs[name] = result
                rows.append(
                    {
                        "length": length,
                        "prompt_tokens": len(ids),
                        "seed": seed,
                        "path": name,
                        "itl_p50_ms": result.metrics.itl_p50_ms,
                        "decode_ms": result.metrics.decode_ms,
                        "ttft_ms": result.metrics.ttft_ms,
                        "found_needle": prompt.case.needle.found_in(result.text),
                        "agrees_with_float32": common_prefix(result.token_ids, float32),
                    }
                )
            same = outputs["torch_sdpa"].token_ids == outputs["float32_by_hand"].token_ids
            for row in rows[-2:]:
                row["same_tokens"] = same
    return rows


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy outputs share before they part."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def summarise_engine(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for length in dict.fromkeys(row["length"] for row in rows):
        mine = [row for row in rows if row["length"] == length]
        by = {p: [r for r in mine if r["path"] == p] for p in ("torch_sdpa", "float32_by_hand")}
        pairs = zip(by["torch_sdpa"], by["float32_by_hand"], strict=True)
        out.append(
            {
                "length": length,
                "prompt_tokens": round(statistics.median(r["prompt_tokens"] for r in mine)),
                "itl_torch_sdpa_ms": statistics.median(r["itl_p50_ms"] for r in by["torch_sdpa"]),
                "itl_float32_by_hand_ms": statistics.median(r["itl_p50_ms"] for r in by["float32_by_hand"]),
                "itl_speedup": statistics.median(a["itl_p50_ms"] / b["itl_p50_ms"] for a, b in pairs),
                "same_tokens": sum(r["same_tokens"] for r in by["torch_sdpa"]),
                **{f"found_{p}": sum(r["found_needle"] for r in by[p]) for p in by},
                **{f"agree_{p}": statistics.median(r["agrees_with_float32"] for r in by[p]) for p in by},
                "prompts": len(by["torch_sdpa"]),
            }
        )
    return out


def doc_section(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        DOC_HEADING,
        "",
        f"`python -m bench.decode_attention`, {machine['cpu']} ({machine['cpu_cores']} cores, flags "
        f"{', '.join(machine['cpu_flags'])}), torch {machine['torch']}, bfloat16, {result['started_at']}; load "
        f"average {result['loadavg_before']} before, {result['loadavg_after']} after. Both paths in one process, "
        f"interleaved; medians. `bench/results/decode_attention.json`.",
        "",
        "One layer's decode attention (9 query heads, 3 KV heads, d=64):",
        "",
        "| cache entries | torch SDPA us | float32 by hand us | speedup |",
        "|---:|---:|---:|---:|",
    ]
    for row in result["kernel"]:
        lines.append(
            f"| {row['cache_entries']} | {row['torch_sdpa_us']:.0f} | {row['float32_by_hand_us']:.0f} | "
            f"{row['speedup']:.2f}x |"
        )
    lines += [
        "",
        f"SmolLM2-135M through the engine, `none`, {result['max_tokens']} output tokens per prompt:",
        "",
        "| prompt tokens | ITL p50 ms, torch SDPA | ITL p50 ms, by hand | speedup | same tokens | needle found "
        "(SDPA / by hand) | tokens agreeing with float32 (SDPA / by hand) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["engine_summary"]:
        lines.append(
            f"| {row['prompt_tokens']} | {row['itl_torch_sdpa_ms']:.1f} | {row['itl_float32_by_hand_ms']:.1f} | "
            f"{row['itl_speedup']:.2f}x | {row['same_tokens']} of {row['prompts']} | {row['found_torch_sdpa']} / "
            f"{row['found_float32_by_hand']} | {row['agree_torch_sdpa']:.0f} / {row['agree_float32_by_hand']:.0f} |"
        )
    for note in result.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    with figure(path, 1, 2, figsize=(11, 4)) as (_fig, (left, right)):
        kernel = result["kernel"]
        for name in ("torch_sdpa", "float32_by_hand"):
            left.plot([r["cache_entries"] for r in kernel], [r[f"{name}_us"] for r in kernel], marker="o", label=name)
            right.plot(
                [r["prompt_tokens"] for r in result["engine_summary"]],
                [r[f"itl_{name}_ms"] for r in result["engine_summary"]],
                marker="o",
                label=name,
            )
        left.set(xscale="log", yscale="log", xlabel="cache entries", ylabel="us per layer")
        left.set_title("one layer's decode attention")
        right.set(xlabel="prompt tokens", ylabel="ms", title="SmolLM2 ITL p50 (bfloat16)")
        for ax in (left, right):
            ax.grid(alpha=0.3)
            ax.legend()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--prompts", type=int, default=3, help="prompts per length")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="kernel timing repeats")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "decode_attention.json")
    parser.add_argument("--note", action="append", default=[])
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {**result_header("smollm2-135m-instruct", "bfloat16"), "max_tokens": args.max_tokens}
    result["kernel"] = kernel_times(args.repeats)
    result["engine"] = engine_times(args.lengths, args.prompts, args.max_tokens)
    result["engine_summary"] = summarise_engine(result["engine"])
    result["notes"] = args.note
    stamp_finish(result)
    write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    if not args.no_doc:
        replace_doc_section(DOC_HEADING, doc_section(result))


if __name__ == "__main__":
    main()
