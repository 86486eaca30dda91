"""GemFilter's filter pass in bfloat16 beside a float32 model: what it does to the selection (issue 23).

GemFilter only ranks tokens, so its pass may run in a cheaper dtype than generation. Per prompt,
one float32 model generates in both configurations; the filter pass runs once on the model itself
(float32) and once on a bfloat16 copy of layers ``0..r`` (``--filter-dtype bfloat16``). Recorded:
the share of the answer's tokens each selection kept (recall), the overlap of the two kept sets,
and whether each greedy answer holds the needle's answer. A quality measurement, not a timing one:
on a CPU without native bfloat16 the bfloat16 pass is several times slower, which says nothing of
a CPU that has it.

Families as in bench.filter_attention (``code`` is the held-out one, reported apart).

    python -m bench.filter_dtype --lengths 2048,4096,8000 --depths 0,0.5,1
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from bench.attention import found
from bench.common import RESULTS_DIR, model_slug, replace_doc_section, result_header, stamp_finish, write_json
from bench.filter_attention import FAMILIES, build_case
from bench.heldout import HELDOUT_FAMILY

logger = logging.getLogger(__name__)

DOC_HEADING = "## GemFilter's filter pass in bfloat16, generation in float32 (issue 23)"


def select_and_answer(engine: Any, ids: list[int], budget: int, max_tokens: int) -> tuple[list[int], str, str]:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    request = GenerationRequest(
        prompt_ids=ids,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        compression=CompressionSpec(
            method="gemfilter", knobs={"budget": budget, "payoff_ratio": 0}, return_selection=True
        ),
    )
    result = engine.generate(request)
    return result.compression.selection.kept_indices, result.text, result.compression.filter_dtype or ""


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.engine.hf import HFEngine
    from server.models import load_model
    from server.precision import resolve_dtype

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32", filter_dtype="float32")
    engines = {
        "float32": HFEngine(loaded),
        "bfloat16": HFEngine(dataclasses.replace(loaded, filter_dtype=resolve_dtype("bfloat16", "cpu"))),
    }
    chat = loaded.tokenizer.chat_template is not None
    out_path = RESULTS_DIR / f"filter_dtype_{model_slug(loaded.name)}.json"
    result: dict[str, Any] = {
        **result_header(loaded.name, "float32"),
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "rows": [],
    }
    for length in args.lengths:
        for d, depth in enumerate(args.depths):
            for f, family in enumerate(args.families):
                seed = args.seed + 7919 * length + 101 * d + f
                case = build_case(engines["float32"], family, length, depth, seed, chat)
                row: dict[str, Any] = {"length": length, "tokens": len(case.prompt_ids), "family": family}
                row["depth"], kept = depth, {}
                for name, engine in engines.items():
                    kept[name], text, filter_dtype = select_and_answer(
                        engine, case.prompt_ids, args.budget, args.max_tokens
                    )
                    assert filter_dtype == name, (filter_dtype, name)
                    positions = case.answer_positions
                    row[name] = {
                        "found": found(case.answer, text),
                        "recall": sum(p in set(kept[name]) for p in positions) / len(positions) if positions else None,
                        "text": text[:80],
                    }
                row["overlap"] = round(len(set(kept["float32"]) & set(kept["bfloat16"])) / len(kept["float32"]), 4)
                logger.info("%d %s d=%.2f: %s", length, family, depth, row)
                result["rows"].append(row)
                write_json(out_path, result)
    stamp_finish(result)
    result["summary"] = summarise(result["rows"])
    write_json(out_path, result)
    if not args.no_doc:
        replace_doc_section(f"{DOC_HEADING} — {model_slug(loaded.name)}", markdown_section(result, out_path))
    return result


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for family in [f for f in FAMILIES if any(r["family"] == f for r in rows)]:
        for length in sorted({r["length"] for r in rows if r["family"] == family}):
            cell = [r for r in rows if r["family"] == family and r["length"] == length]
            entry: dict[str, Any] = {"family": family, "length": length, "prompts": len(cell)}
            for name in ("float32", "bfloat16"):
                recalls = [r[name]["recall"] for r in cell if r[name]["recall"] is not None]
                entry[f"{name}_found"] = sum(r[name]["found"] for r in cell)
                entry[f"{name}_recall"] = round(sum(recalls) / len(recalls), 3) if recalls else None
            entry["overlap_mean"] = round(sum(r["overlap"] for r in cell) / len(cell), 3)
            out.append(entry)
    return out


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    m = result["machine"]
    lines = [
        f"{DOC_HEADING} — {model_slug(result['model'])}",
        "",
        f"Measured {result['started_at']} to {result['finished_at']} with `python -m bench.filter_dtype` on {m['cpu']} "
        f"({m['cpu_cores']} cores, flags {', '.join(m['cpu_flags']) or '-'}), {result['model']}: the model in float32, "
        f"GemFilter k={result['budget']} (payoff_ratio 0) with its filter pass in float32 (on the model) and in "
        "bfloat16 (on a copy of layers 0..r), greedy, "
        f"{result['max_tokens']} new tokens. Quality only: this CPU emulates bfloat16, so no timing is reported. "
        f"Overlap = kept tokens both passes chose / k. Family `{HELDOUT_FAMILY}` is held out (never tuned on). "
        f"Data `bench/results/{out_path.name}`.",
        "",
        "| family | tokens | prompts | answers fp32 pass | answers bf16 pass | recall fp32 | recall bf16 | overlap |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['family']} | {s['length']} | {s['prompts']} | {s['float32_found']} | {s['bfloat16_found']} | "
            f"{fmt(s['float32_recall'])} | {fmt(s['bfloat16_recall'])} | {s['overlap_mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8000])
    parser.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 1.0])
    parser.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILIES))
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=29_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-doc", action="store_true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
