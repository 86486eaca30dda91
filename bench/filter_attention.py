"""GemFilter's filter pass on sparse attention: does it keep the answers of the dense pass? (issue 23)

One process, one model load. Per prompt every configuration runs GemFilter (k = ``--budget``,
``payoff_ratio=0`` so the filter pass runs at every length) with one attention backend for the
layers before the filter layer, in an order rotated per prompt, so the VM's drift hits all alike.
Per run: whether the greedy answer holds the needle's answer, the share of the answer's tokens the
selection kept (recall), the filter pass's time (``select_ms``) and density, and TTFT; ratios are
taken against the dense filter pass on the same prompt.

Families: ``synthetic`` (contract.needles), ``prose`` (stdlib docs and license texts,
bench.gemfilter_scoring's needles), ``records`` (the eval suite's log/table haystack, niah_single)
and ``code`` (bench.heldout: written for this issue, never tuned on, reported apart).

    python -m bench.filter_attention --lengths 2048,4096,8000 --depths 0,0.5,1
    python -m bench.filter_attention --model gemma3-270m --lengths 8000,16000,32000 --depths 0,0.5,1
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from bench.attention import build_prompt, found, prose_parts, synthetic_parts
from bench.common import (
    RESULTS_DIR,
    figure,
    length_axes,
    model_slug,
    replace_doc_section,
    result_header,
    rotated,
    stamp_finish,
    write_json,
)
from bench.heldout import HELDOUT_FAMILY, code_parts

logger = logging.getLogger(__name__)

DOC_HEADING = "## GemFilter's filter pass on sparse attention (issue 23)"
BASELINE = "dense"
TUNED_FAMILIES = ("synthetic", "prose", "records")
FAMILIES = (*TUNED_FAMILIES, HELDOUT_FAMILY)


@dataclass(frozen=True)
class Config:
    label: str
    backend: str
    knobs: dict[str, Any]


def parse_config(text: str) -> Config:
    """``label=backend`` or ``label=backend:knob=value,knob=value`` (values are ints or floats)."""
    label, _, spec = text.partition("=")
    backend, _, knob_text = (spec or label).partition(":")
    knobs: dict[str, Any] = {}
    for pair in filter(None, knob_text.split(",")):
        name, _, value = pair.partition("=")
        knobs[name] = float(value) if "." in value else int(value)
    return Config(label, backend, knobs)


DEFAULT_CONFIGS = ("dense", "streaming", "vertical_slash", "block_sparse")


# ---- prompts --------------------------------------------------------------------------------
@dataclass
class Case:
    family: str
    depth: float
    prompt_ids: list[int]
    answer: str
    answer_positions: list[int]


def records_parts(target: int, depth: float, seed: int, count) -> tuple[str, str, str, str]:
    from evals.tasks import build_sample

    sample = build_sample("niah_single", "records", target, depth, seed, lambda s: count(s.context))
    return sample.context, sample.question, sample.answer_prefix, sample.answers[0]


def build_case(engine: Any, family: str, target: int, depth: float, seed: int, chat: bool) -> Case:
    from bench.gemfilter_scoring import prose_paragraphs

    def count(text: str) -> int:
        return len(engine.encode_prompt(text))

    body = target - 40  # the instruction, question and template around the document
    if family == "synthetic":
        parts = synthetic_parts(body, depth, seed, count)
    elif family == "prose":
        parts = prose_parts(body, depth, seed, count, prose_paragraphs()[0])
    elif family == "records":
        parts = records_parts(body, depth, seed, count)
    else:
        parts = code_parts(body, depth, seed, count)
    ids, answer = build_prompt(engine, parts, chat)
    return Case(family, depth, ids, answer, answer_positions(engine, parts, ids, chat))


def answer_positions(engine: Any, parts: tuple[str, str, str, str], ids: list[int], chat: bool) -> list[int]:
    """Positions of the answer's tokens inside the document (not in the answer prefix or output)."""
    from evals.targets import tokens_overlapping

    document, question, prefix, answer = parts
    if chat:
        content = f"Read the document below and answer the question at the end.\n\n{document}\n\nQuestion: {question}"
        text = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = f"{document}\n\nQuestion: {question}\nAnswer: {prefix}"
    encoded = engine.tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        return []  # cannot locate: recall is left out for this prompt
    start = text.index(document)
    end = start + len(document)
    positions: list[int] = []
    at = text.find(answer, start)
    while 0 <= at < end:
        positions += tokens_overlapping(encoded["offset_mapping"], at, at + len(answer))
        at = text.find(answer, at + 1)
    return sorted(set(positions))


# ---- measurement ----------------------------------------------------------------------------
def run_one(engine: Any, case: Case, config: Config, budget: int, max_tokens: int) -> dict[str, Any]:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    knobs = {"budget": budget, "payoff_ratio": 0, "filter_attention": config.backend}
    if config.knobs:
        knobs["filter_attention_knobs"] = config.knobs
    request = GenerationRequest(
        prompt_ids=case.prompt_ids,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        compression=CompressionSpec(method="gemfilter", knobs=knobs, return_selection=True),
    )
    result = engine.generate(request)
    kept = set(result.compression.selection.kept_indices)
    recall = (
        sum(p in kept for p in case.answer_positions) / len(case.answer_positions) if case.answer_positions else None
    )
    report = result.compression.filter_attention
    return {
        "config": config.label,
        "found": found(case.answer, result.text),
        "recall": recall,
        "select_ms": round(result.metrics.select_ms, 1),
        "ttft_ms": round(result.metrics.ttft_ms, 1),
        "filter_density": None if report is None else round(report.density, 4),
        "text": result.text[:100],
    }


def summarise(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per (length, family, config): answers, mean recall, median paired time ratios against dense."""
    out = []
    cells = sorted({(r["length"], r["family"]) for r in rows}, key=lambda c: (c[0], FAMILIES.index(c[1])))
    for length, family in cells:
        prompts = [r for r in rows if r["length"] == length and r["family"] == family]
        for label in labels:
            runs = [(p, p["runs"][label]) for p in prompts if label in p["runs"]]
            if not runs:
                continue
            recalls = [run["recall"] for _, run in runs if run["recall"] is not None]
            base = [(p["runs"][BASELINE], run) for p, run in runs if BASELINE in p["runs"]]
            out.append(
                {
                    "length": length,
                    "family": family,
                    "config": label,
                    "prompts": len(runs),
                    "found": sum(run["found"] for _, run in runs),
                    "recall_mean": round(sum(recalls) / len(recalls), 3) if recalls else None,
                    "select_ratio": round(median(r["select_ms"] / b["select_ms"] for b, r in base), 3)
                    if base
                    else None,
                    "ttft_ratio": round(median(r["ttft_ms"] / b["ttft_ms"] for b, r in base), 3) if base else None,
                    "select_ms_median": round(median(run["select_ms"] for _, run in runs), 1),
                    "filter_density_mean": round(sum(run["filter_density"] or 0.0 for _, run in runs) / len(runs), 3),
                }
            )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.engine.hf import HFEngine
    from server.models import load_model

    torch.set_num_threads(args.threads)
    engine = HFEngine(load_model(args.model, device="cpu", dtype=args.dtype, filter_dtype=args.dtype))
    chat = engine.tokenizer.chat_template is not None
    configs = [parse_config(text) for text in args.configs]
    labels = [c.label for c in configs]
    if BASELINE not in labels:
        raise ValueError(f"the configurations must include '{BASELINE}' (the baseline)")
    slug = model_slug(engine.model_name)
    out_path = Path(args.out) if args.out else RESULTS_DIR / f"filter_attention_{slug}.json"
    result: dict[str, Any] = {
        **result_header(engine.model_name, engine.dtype),
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "prompt_style": "chat" if chat else "completion",
        "configs": [c.__dict__ for c in configs],
        "families": args.families,
        "rows": [],
    }
    warm = build_case(engine, "synthetic", 600, 0.5, args.seed - 1, chat)
    for config in configs:
        run_one(engine, warm, config, 128, 2)
    turn = 0
    for length in args.lengths:
        for d, depth in enumerate(args.depths):
            for f, family in enumerate(args.families):
                seed = args.seed + 7919 * length + 101 * d + f
                case = build_case(engine, family, length, depth, seed, chat)
                runs = {}
                for config in rotated(configs, turn):
                    runs[config.label] = run_one(engine, case, config, args.budget, args.max_tokens)
                    logger.info("%d %s d=%.2f %s: %s", length, family, depth, config.label, runs[config.label])
                row = {"length": length, "tokens": len(case.prompt_ids), "family": family, "depth": depth}
                result["rows"].append({**row, "answer": case.answer, "runs": runs})
                result["summary"] = summarise(result["rows"], labels)
                write_json(out_path, result)
                turn += 1
    stamp_finish(result)
    result["summary"] = summarise(result["rows"], labels)
    write_json(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    if not args.no_doc:
        replace_doc_section(f"{DOC_HEADING} — {slug}", markdown_section(result, out_path))
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    labels = [c["label"] for c in result["configs"]]
    lengths = sorted({s["length"] for s in result["summary"]})
    with figure(path, 1, 2, figsize=(12, 4.5)) as (fig, axes):
        for label in labels:
            rows = [s for s in result["summary"] if s["config"] == label]
            answers = [sum(s["found"] for s in rows if s["length"] == n) for n in lengths]
            prompts = [sum(s["prompts"] for s in rows if s["length"] == n) for n in lengths]
            ratios = [median([s["select_ratio"] for s in rows if s["length"] == n]) for n in lengths]
            axes[0].plot(lengths, ratios, "-o", label=label, markersize=4)
            axes[1].plot(
                lengths, [a / p for a, p in zip(answers, prompts, strict=True)], "-o", label=label, markersize=4
            )
        axes[0].set_title("filter pass time / dense filter pass (median per family)")
        axes[1].set_title("answers found (all families)")
        length_axes(axes)
        fig.suptitle(f"GemFilter filter-pass attention, {result['model']} {result['dtype']}, k={result['budget']}")


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    m = result["machine"]
    knobs = "; ".join(
        f"`{c['label']}` = {c['backend']}" + (f" {c['knobs']}" if c["knobs"] else "") for c in result["configs"]
    )
    lines = [
        f"{DOC_HEADING} — {model_slug(result['model'])}",
        "",
        f"Measured {result['started_at']} to {result['finished_at']} with `python -m bench.filter_attention` on "
        f"{m['cpu']} ({m['cpu_cores']} cores, flags {', '.join(m['cpu_flags']) or '-'}, torch {m['torch']}), "
        f"{result['model']} {result['dtype']}, {result['prompt_style']} prompts, GemFilter k={result['budget']} "
        f"(payoff_ratio 0: the pass runs at every length), greedy, {result['max_tokens']} new tokens. Load average "
        f"before/after: {result['loadavg_before']} / {result['loadavg_after']}. One process, configurations rotated "
        f"per prompt; ratios are medians of per-prompt ratios against `{BASELINE}`. Configurations: {knobs}. "
        f"Family `{HELDOUT_FAMILY}` (bench/heldout.py) was never used to choose anything. Data "
        f"`bench/results/{out_path.name}`, plot `bench/results/{out_path.with_suffix('.png').name}`.",
        "",
        "| tokens | family | configuration | answers | answer recall | filter time ratio | TTFT ratio | density |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        recall = "-" if s["recall_mean"] is None else f"{s['recall_mean']:.2f}"
        lines.append(
            f"| {s['length']} | {s['family']} | {s['config']} | {s['found']}/{s['prompts']} | {recall} | "
            f"{s['select_ratio']:.3f} | {s['ttft_ratio']:.3f} | {s['filter_density_mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto", help="the model's and the filter pass's dtype")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 4096, 8000])
    parser.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.5, 1.0])
    parser.add_argument(
        "--families", type=lambda s: s.split(","), default=list(FAMILIES), help=f"from {', '.join(FAMILIES)}"
    )
    parser.add_argument(
        "--configs",
        type=lambda s: s.split(";"),
        default=list(DEFAULT_CONFIGS),
        help="';'-separated label=backend:knob=value,... (must include 'dense')",
    )
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=23_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="result JSON (default bench/results/filter_attention_<model>.json)")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
