"""Attention backends benchmark (issue 11): TTFT ratio and answers by backend x prompt length.

One process, one model load; every configuration answers the same needle prompt before the next
prompt is built, in an order rotated per prompt (A B C, B C A, ...), so the VM's drift hits all
configurations alike and each TTFT ratio is taken against the baseline on the *same* prompt. Two
haystack families: ``synthetic`` (contract.needles: varied filler, random needles) and ``prose``
(real text: stdlib docs and license texts, needles of templates used nowhere else).

Configurations: ``none`` with every attention backend for the whole prefill, and GemFilter (k =
``--budget``) with every backend for its filter pass. On models with sliding-window layers the
baseline also runs ``dense`` with ``sliding_band=false`` (SDPA over all n x n pairs with the band
as a mask, what transformers does) so the band's own gain is visible.

Writes bench/results/attention_<model>.json (after every prompt), a PNG, and a section of
docs/benchmarks.md.

    python -m bench.attention --lengths 1024,2048,4096,8000
    python -m bench.attention --model gemma3-270m --lengths 16000 --depths 2
"""

from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

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

logger = logging.getLogger(__name__)

BACKENDS = ("dense", "streaming", "vertical_slash", "block_sparse")
BASELINE = "none/dense"
DOC_HEADING = "## Attention backends: sparse prefill and GemFilter's filter pass (issue 11)"


@dataclass(frozen=True)
class Config:
    label: str
    method: str
    knobs: dict[str, Any]
    attention: str | None = None
    attention_knobs: dict[str, Any] | None = None


def configs(budget: int, sliding: bool) -> list[Config]:
    out = [Config(f"none/{name}", "none", {}, name) for name in BACKENDS]
    if sliding:
        out.append(Config("none/dense-sdpa-mask", "none", {}, "dense", {"sliding_band": False}))
    out += [
        Config(f"gemfilter/{name}", "gemfilter", {"budget": budget, "filter_attention": name}, "dense")
        for name in BACKENDS
    ]
    return out


# ---- prompts --------------------------------------------------------------------------------
@dataclass
class NeedleCase:
    family: str
    depth: float
    prompt_ids: list[int]
    answer: str


def synthetic_parts(target: int, depth: float, seed: int, count) -> tuple[str, str, str, str]:
    """(document, question, answer prefix, answer) from contract.needles."""
    from contract.needles import build_case

    case = build_case(target, depth=depth, seed=seed, count_tokens=count)
    sentence, answer = case.needle.sentence, case.needle.answer
    return case.document, case.needle.question, sentence[: sentence.rindex(answer)].strip(), answer


def prose_parts(target: int, depth: float, seed: int, count, paragraphs: list[str]) -> tuple[str, str, str, str]:
    from bench.gemfilter_scoring import PROSE_NEEDLES

    rng = random.Random(seed)
    template, question, answers = PROSE_NEEDLES[seed % len(PROSE_NEEDLES)]
    answer = rng.choice(answers)
    needle = template.format(a=answer)
    order = paragraphs[:]
    rng.shuffle(order)

    def document(count_paragraphs: int) -> str:
        body = order[:count_paragraphs]
        at = round(depth * len(body))
        return "\n\n".join([*body[:at], needle, *body[at:]])

    low, high = 1, 8
    while count(document(high)) < target and high < len(order):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(document(mid)) <= target else (low, mid)
    return document(low), question, needle[: needle.index(answer)].strip(), answer


def build_prompt(engine: Any, parts: tuple[str, str, str, str], chat: bool) -> tuple[list[int], str]:
    """Chat models get the question as a user turn; base models a completion prompt ending with
    the start of the answer sentence (RULER's answer prefix: a bare "Answer:" fails them)."""
    document, question, prefix, answer = parts
    if chat:
        text = f"Read the document below and answer the question at the end.\n\n{document}\n\nQuestion: {question}"
        return engine.encode_chat([{"role": "user", "content": text}]), answer
    return engine.encode_prompt(f"{document}\n\nQuestion: {question}\nAnswer: {prefix}"), answer


def needle_cases(engine: Any, target: int, depths: list[float], seed: int, chat: bool) -> list[NeedleCase]:
    from bench.gemfilter_scoring import prose_paragraphs

    paragraphs, _ = prose_paragraphs()
    overhead = 40  # the instruction, question and template around the document

    def count(text: str) -> int:
        return len(engine.encode_prompt(text))

    cases = []
    for i, depth in enumerate(depths):
        for family in ("synthetic", "prose"):
            case_seed = seed + 1000 * i + (0 if family == "synthetic" else 500)
            parts = (
                synthetic_parts(target - overhead, depth, case_seed, count)
                if family == "synthetic"
                else prose_parts(target - overhead, depth, case_seed, count, paragraphs)
            )
            ids, answer = build_prompt(engine, parts, chat)
            cases.append(NeedleCase(family, depth, ids, answer))
    return cases


def found(answer: str, text: str) -> bool:
    return answer.lower() in text.lower() or answer.replace(",", "") in text.replace(",", "").replace(" ", "")


# ---- measurement ----------------------------------------------------------------------------
def run_one(engine: Any, case: NeedleCase, config: Config, max_tokens: int) -> dict[str, Any]:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    spec = CompressionSpec(
        method=config.method,
        knobs=config.knobs,
        attention=config.attention,
        attention_knobs=config.attention_knobs or {},
    )
    request = GenerationRequest(
        prompt_ids=case.prompt_ids, sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0), compression=spec
    )
    result = engine.generate(request)
    compression, metrics = result.compression, result.metrics
    return {
        "config": config.label,
        "ttft_ms": round(metrics.ttft_ms, 1),
        "select_ms": round(metrics.select_ms, 1),
        "prefill_ms": round(metrics.prefill_ms, 1),
        "kept_tokens": compression.kept_tokens,
        "skipped": compression.skipped,
        "density": (compression.attention or {}).get("density"),
        "filter_density": (compression.filter_attention or {}).get("density"),
        "found": found(case.answer, result.text),
        "text": result.text[:120],
    }


def summarise(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Per (length, config): answers, median paired TTFT ratio against the baseline, densities."""
    out = []
    for length in sorted({r["length"] for r in rows}):
        prompts = [r for r in rows if r["length"] == length]
        for label in labels:
            runs = [(p, p["runs"][label]) for p in prompts if label in p["runs"]]
            if not runs:
                continue
            ratios = [run["ttft_ms"] / p["runs"][BASELINE]["ttft_ms"] for p, run in runs]
            densities = [run["density"] for _, run in runs if run["density"] is not None]
            filter_densities = [run["filter_density"] for _, run in runs if run["filter_density"] is not None]
            out.append(
                {
                    "length": length,
                    "config": label,
                    "prompts": len(runs),
                    "found": sum(run["found"] for _, run in runs),
                    "ttft_ratio_median": round(median(ratios), 3),
                    "ttft_ms_median": round(median(run["ttft_ms"] for _, run in runs), 1),
                    "density_mean": round(sum(densities) / len(densities), 3) if densities else None,
                    "filter_density_mean": round(sum(filter_densities) / len(filter_densities), 3)
                    if filter_densities
                    else None,
                    "skipped": sum(bool(run["skipped"]) for _, run in runs),
                }
            )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.engine.hf import HFEngine
    from server.models import load_model

    torch.set_num_threads(args.threads)
    engine = HFEngine(load_model(args.model, device="cpu"))
    text_config = engine.model.config.get_text_config()
    sliding = any(kind == "sliding_attention" for kind in (getattr(text_config, "layer_types", None) or []))
    chat = engine.tokenizer.chat_template is not None and not args.completion
    all_configs = configs(args.budget, sliding)
    labels = [c.label for c in all_configs]
    slug = model_slug(engine.model_name)
    out_path = Path(args.out) if args.out else RESULTS_DIR / f"attention_{slug}.json"
    result: dict[str, Any] = {
        **result_header(engine.model_name),
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "prompt_style": "chat" if chat else "completion",
        "configs": [c.__dict__ for c in all_configs],
        "rows": [],
    }
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    # Warm-up: one short request per configuration (first-call costs stay out of the table).
    warm = needle_cases(engine, 600, [0.5], args.seed + 99, chat)[0]
    for config in all_configs:
        run_one(engine, warm, config, 2)
    turn = 0
    for length in args.lengths:
        for case in needle_cases(engine, length, depths, args.seed + length, chat):
            runs = {}
            for config in rotated(all_configs, turn):
                runs[config.label] = run_one(engine, case, config, args.max_tokens)
                logger.info("%s %s d=%.2f %s: %s", length, case.family, case.depth, config.label, runs[config.label])
            row = {"length": length, "tokens": len(case.prompt_ids), "family": case.family, "depth": case.depth}
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
    summary = result["summary"]
    labels = [c["label"] for c in result["configs"]]
    with figure(path, 1, 2, figsize=(12, 4.5)) as (fig, axes):
        for label in labels:
            points = sorted(
                (s["length"], s["ttft_ratio_median"], s["found"] / s["prompts"])
                for s in summary
                if s["config"] == label
            )
            if not points:
                continue
            lengths, ratios, answers = zip(*points, strict=True)
            style = "--o" if label.startswith("gemfilter") else "-o"
            axes[0].plot(lengths, ratios, style, label=label, markersize=4)
            axes[1].plot(lengths, answers, style, label=label, markersize=4)
        axes[0].set_title(f"TTFT / TTFT of {BASELINE} (median of paired ratios)")
        axes[1].set_title("needles answered (fraction)")
        length_axes(axes)
        fig.suptitle(f"Attention backends, {result['model']}, {result['machine']['cpu_cores']}-core CPU")


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    m = result["machine"]
    lines = [
        f"{DOC_HEADING} — {model_slug(result['model'])}",
        "",
        f"Measured {result['started_at']} to {result['finished_at']} with `python -m bench.attention` on {m['cpu']} "
        f"({m['cpu_cores']} cores, torch {m['torch']}, transformers {m['transformers']}), {result['model']} "
        f"{m['dtype']}, "
        f"{result['prompt_style']} prompts, greedy, {result['max_tokens']} new tokens, GemFilter k={result['budget']}. "
        f"Load average before/after: {result['loadavg_before']} / {result['loadavg_after']}. One process; per prompt "
        "every configuration ran in a rotated order; TTFT ratio = median over prompts of TTFT / TTFT of "
        f"`{BASELINE}` on the same prompt. Density = computed / causal query-key pairs over all layers and heads "
        f"(GemFilter: of its filter pass). Data `bench/results/{out_path.name}`, plot "
        f"`bench/results/{out_path.with_suffix('.png').name}`.",
        "",
        "| tokens | configuration | answers | TTFT ratio | TTFT ms (median) | density | filter density | skipped |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['length']} | {s['config']} | {s['found']}/{s['prompts']} | {s['ttft_ratio_median']:.3f} | "
            f"{s['ttft_ms_median']:.0f} | {fmt(s['density_mean'])} | {fmt(s['filter_density_mean'])} | {s['skipped']} |"
        )
    return "\n".join(lines) + "\n"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8000])
    parser.add_argument("--depths", type=int, default=3, help="needle depths per family and length")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=11_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--completion", action="store_true", help="completion prompts even for a chat model")
    parser.add_argument("--out", help="result JSON (default bench/results/attention_<model>.json)")
    parser.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
