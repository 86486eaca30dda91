"""The fallback's curve (issue 26): which of GemFilter's misses a confidence threshold catches, and
what falling back costs in TTFT.

Reads the rows of a finished ``gemserve eval`` run (``--records DIR``: GemFilter's configuration
``--method`` and ``none`` on the same prompts), rebuilds each prompt, reruns GemFilter's filter pass
in this process and computes the selection's confidence by several definitions:

- ``mass`` (what ``compression.confidence`` reports: compressors.gemfilter.selection_confidence):
  the share of the filter layer's attention mass the kept tokens hold;
- ``top_unit``: the share of that mass in the best kept unit (one dominant piece of text);
- ``margin``: the pooled score of the worst kept unit minus that of the best dropped one;
- ``answer``: the mean log-probability of GemFilter's own answer (the eval's output text, encoded
  again) given the kept tokens. It is known only once the answer is generated, so a fallback on it
  pays GemFilter's whole generation before the uncompressed run: the strongest signal tried here,
  measured to see what a confidence could catch at best, not one the server offers.

For each definition and threshold: the share of requests that fall back (run uncompressed), the
share of GemFilter's misses (score < 0.5) caught, how many of those ``none`` answered, and the
median TTFT with the fallback over GemFilter's median: TTFT (``max_tokens=1``) is timed here for
``none`` and for GemFilter on the first two prompts of each length, in turn (A B, then B A), each
prompt taking its length's medians; a request that falls back pays GemFilter's TTFT plus
``none``'s (what the fallback runs: the filter pass, then the whole prompt; an estimate from
measured parts, not a timed fallback), and on ``answer`` also GemFilter's decoding of its answer
(its tokens times GemFilter's inter-token latency, timed on the same prompts).
Writes JSON and a PNG beside the records and prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import figure, machine_description
from compressors.gemfilter import GemFilter, pooled_scores, selection_confidence
from compressors.units import best_per_unit, pick_whole_units, unit_index
from contract.methods import parse_method
from evals.runner import load_records
from evals.tasks import build_sample

MISS = 0.5  # a row scoring below this is a miss
CONFIDENCES = ("mass", "top_unit", "margin", "answer")
ITL_TOKENS = 16  # tokens GemFilter generates for its inter-token latency (their median gap)
ANSWER_TOKENS = 64  # the answer's tokens scored (the eval's outputs are shorter)


def unit_scores(
    method: GemFilter, pooled: torch.Tensor, ids: torch.Tensor, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's unit and each unit's best pooled score (the selection's units)."""
    begins = method.unit_begins(ids, tokenizer)
    unit = unit_index(torch.ones(pooled.numel(), dtype=torch.bool) if begins is None else begins)
    return unit, best_per_unit(pooled, unit)


def measures(
    method: GemFilter, scores: torch.Tensor, ids: torch.Tensor, tokenizer: Any, keep: int
) -> tuple[dict[str, float], list[int]]:
    """The selection's confidences, and the kept indices (in prompt order)."""
    pooled = pooled_scores(scores, method.kernel_size, method.fuse).cpu()
    n = pooled.numel()
    begins = method.unit_begins(ids, tokenizer)
    kept = pick_whole_units(pooled, keep, method.tail, begins, method.head) if begins is not None else None
    assert kept is not None
    mass = (scores[-1] if scores.dim() == 2 else scores).to(torch.float32).cpu().clamp_min(0.0)
    chosen = torch.ones(n, dtype=torch.bool)
    chosen[: max(1, method.head)] = False
    chosen[n - method.tail :] = False
    kept_mask = torch.zeros(n, dtype=torch.bool)
    kept_mask[torch.tensor(kept)] = True
    unit, best = unit_scores(method, pooled, ids, tokenizer)
    free_units = torch.unique(unit[chosen])
    kept_units = torch.unique(unit[chosen & kept_mask])
    dropped_units = free_units[~torch.isin(free_units, kept_units)]
    unit_mass = torch.zeros(best.numel()).scatter_add(0, unit[chosen], mass[chosen])
    total = float(mass[chosen].sum())
    return {
        "mass": selection_confidence(scores, method.scoring, kept, method.head, method.tail) or 0.0,
        "top_unit": float(unit_mass[kept_units].max()) / total if total > 0 and kept_units.numel() else 0.0,
        "margin": float(best[kept_units].min() - best[dropped_units].max())
        if kept_units.numel() and dropped_units.numel()
        else 1.0,
    }, sorted(kept)


def time_first_tokens(engine: Any, ids: list[int], knobs: dict[str, Any], first_none: bool) -> dict[str, float]:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    def metrics(method: str, method_knobs: dict[str, Any], sampling: SamplingParams) -> Any:
        request = GenerationRequest(
            prompt_ids=ids, sampling=sampling, compression=CompressionSpec(method=method, knobs=method_knobs)
        )
        return engine.generate(request).metrics

    first_token = SamplingParams(max_tokens=1, temperature=0.0)
    order = [("none", {}), ("gemfilter", knobs)] if first_none else [("gemfilter", knobs), ("none", {})]
    times = {name: metrics(name, method_knobs, first_token).ttft_ms for name, method_knobs in order}
    decoding = SamplingParams(max_tokens=ITL_TOKENS, temperature=0.0, ignore_eos=True)
    itl = metrics("gemfilter", knobs, decoding).itl_p50_ms
    return {"ttft_none": times["none"], "ttft_gf": times["gemfilter"], "itl_gf": itl}


def answer_logprob(engine: Any, kept_ids: list[int], output: str) -> tuple[float, int]:
    """The mean log-probability of ``output``'s tokens after ``kept_ids`` (GemFilter's compact
    prompt: the kept tokens at positions 0..k-1, as it generates), and how many tokens it has. An
    empty answer is scored by its end-of-sequence token (the model stopped at once)."""
    answer = engine.tokenizer.encode(output, add_special_tokens=False)[:ANSWER_TOKENS]
    answer = answer or [engine.tokenizer.eos_token_id]
    sequence = torch.tensor([kept_ids + answer], device=engine.model.device)
    with torch.inference_mode():
        logits = engine.model(sequence).logits[0, len(kept_ids) - 1 : -1].float()
    chosen = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(answer, device=logits.device)[:, None])
    return float(chosen.mean()), len(answer)


def fallback_cost(row: dict[str, Any], key: str) -> float:
    """What falling back adds to a request's TTFT: the uncompressed prefill, after GemFilter's whole
    answer when the confidence is that answer's."""
    return row["ttft_none"] + (row["answer_tokens"] * row["itl_gf"] if key == "answer" else 0.0)


def curve(rows: list[dict[str, Any]], key: str) -> list[dict[str, float]]:
    misses = [r for r in rows if r["score"] < MISS]
    base = statistics.median(r["ttft_gf"] for r in rows)
    out = []
    for threshold in sorted({min(0.0, *(r[key] for r in rows)), *(r[key] for r in rows)}):
        back = [r for r in rows if r[key] < threshold]
        caught = [r for r in misses if r[key] < threshold]
        ttft = statistics.median(r["ttft_gf"] + (fallback_cost(r, key) if r[key] < threshold else 0.0) for r in rows)
        out.append(
            {
                "threshold": threshold,
                "fallback_share": len(back) / len(rows),
                "misses_caught": len(caught) / len(misses) if misses else 1.0,
                "caught_none_answers": sum(r["none_score"] >= MISS for r in caught),
                "extra_median_ttft": ttft / base - 1.0,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=Path, required=True, help="a gemserve eval output directory")
    parser.add_argument("--method", required=True, help="the GemFilter row label, e.g. gemfilter:256+span=sentence")
    parser.add_argument("--output", type=Path, help="JSON path (default: fallback_<label>.json in --records)")
    args = parser.parse_args()
    from server.engine.hf import HFEngine
    from server.models import load_model

    records = load_records(args.records / "records.jsonl")
    spec = parse_method(args.method)
    method = GemFilter(**spec.method_knobs())
    if method.positions != "compact":
        raise SystemExit("the answer's log-probability is scored with the kept tokens at positions 0..k-1 (compact)")
    loaded = load_model()
    engine = HFEngine(loaded)
    none = {r["uid"]: r for r in records if r["method"] == "none" and not r.get("error")}
    mine = [r for r in records if r["method"] == args.method and not r.get("error") and r["uid"] in none]
    load_before = list(os.getloadavg())
    rows = []
    timings: dict[int, list[dict[str, float]]] = {}
    for record in mine:
        sample = build_sample(
            record["task"],
            record["haystack"],
            record["target_tokens"],
            record["depth"],
            record["seed"],
            lambda s: len(engine.encode_chat(s.chat_messages())),
        )
        ids = torch.tensor([engine.encode_chat(sample.chat_messages())])
        keep = method.resolve_budget(ids.shape[1], engine.default_budget)
        scores, _ = method.filter_scores(engine.model, ids, engine.filter_model)
        found, kept = measures(method, scores, ids, engine.tokenizer, keep)
        if len(kept) != record["kept_tokens"]:
            raise SystemExit(
                f"{record['uid']}: rebuilt selection keeps {len(kept)}, the eval kept {record['kept_tokens']}"
            )
        found["answer"], answer_tokens = answer_logprob(engine, ids[0, kept].tolist(), record["output"])
        reported = (record.get("compression") or {}).get("confidence")
        if reported is not None and abs(reported - found["mass"]) > 1e-4:
            raise SystemExit(f"{record['uid']}: rebuilt confidence {found['mass']:.4f} != the eval's {reported:.4f}")
        timed = timings.setdefault(record["target_tokens"], [])
        if len(timed) < 2:
            timed.append(time_first_tokens(engine, ids[0].tolist(), spec.method_knobs(), first_none=len(timed) == 0))
        timing = {key: statistics.median(t[key] for t in timed) for key in ("ttft_none", "ttft_gf", "itl_gf")}
        rows.append(
            {
                "uid": record["uid"],
                "task": record["task"],
                "haystack": record["haystack"],
                "tokens": record["prompt_tokens"],
                "score": record["score"],
                "none_score": none[record["uid"]]["score"],
                "answer_tokens": answer_tokens,
                **timing,
                **found,
            }
        )
        print(record["uid"], json.dumps({k: round(v, 3) for k, v in found.items()}), record["score"], flush=True)
    result = {
        "records": str(args.records),
        "method": args.method,
        "machine": machine_description(),
        "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "ttft_timings_ms": timings,
        "rows": rows,
        "curves": {key: curve(rows, key) for key in CONFIDENCES},
    }
    output = args.output or args.records / f"fallback_{args.method.replace(':', '_').replace('+', '_')}.json"
    output.write_text(json.dumps(result, indent=1))
    plot(result, output.with_suffix(".png"))
    print(table(result))


def table(result: dict[str, Any]) -> str:
    lines = [
        "| confidence | threshold | falls back | misses caught | of them `none` answered | extra median TTFT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    misses = sum(r["score"] < MISS for r in result["rows"])
    for key, points in result["curves"].items():
        for goal in (0.5, 0.8, 1.0):
            point = next((p for p in points if p["misses_caught"] >= goal), None)
            if point is not None:
                lines.append(
                    f"| {key} | {point['threshold']:.3f} | {point['fallback_share']:.0%} | "
                    f"{point['misses_caught']:.0%} of {misses} | {point['caught_none_answers']} | "
                    f"{point['extra_median_ttft']:+.0%} |"
                )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    with figure(path, figsize=(6, 4)) as (_fig, ax):
        for key, points in result["curves"].items():
            ax.plot([p["fallback_share"] for p in points], [p["misses_caught"] for p in points], label=key, marker=".")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
        ax.set_xlabel("share of requests that fall back")
        ax.set_ylabel("share of GemFilter's misses caught")
        ax.set_title(f"fallback by confidence: {result['method']}")
        ax.legend()


if __name__ == "__main__":
    main()
