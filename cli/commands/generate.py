"""``gemserve generate``: one long-context answer with a chosen method, and what it cost."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.commands.common import ListKnobs, add_model_arguments, parse_knobs
from contract.needles import Needle

if TYPE_CHECKING:
    from contract.protocol import CompressionInfo
    from server.engine.types import GenerationResult

DEMO_TOKENS = 3500
DEMO_DEPTH = 0.6
DEMO_SEED = 2024
DEMO_ANSWER_PREFIX = "The special magic number for Tallinn is"
DEMO_NEEDLE = Needle(
    "The special magic number for Tallinn is 4817263.", "What is the special magic number for Tallinn?", "4817263"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("question", nargs="?", help="the question (default: the demo needle's question)")
    parser.add_argument("--context-file", type=Path, help="long context to answer from (default: built-in demo)")
    add_model_arguments(parser)
    parser.add_argument("--method", default="gemfilter", help="none | gemfilter | ... (default: gemfilter)")
    parser.add_argument("--budget", type=int, help="tokens to keep (default 1024)")
    parser.add_argument(
        "--ratio", type=float, help="fraction of the prompt to keep (with --budget, the budget caps it)"
    )
    parser.add_argument("--layer", type=int, help="GemFilter filter layer (default: calibrated per model)")
    parser.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="other method knobs; attention=NAME picks the prefill's attention backend, filter_attention=NAME "
        "GemFilter's filter pass backend (dense | streaming | vertical_slash | block_sparse)",
    )
    parser.add_argument(
        "--attention-knob", action="append", default=[], metavar="NAME=VALUE", help="knobs of the attention backend"
    )
    parser.add_argument("--list-knobs", action=ListKnobs, help="list every method's and backend's knobs and exit")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--completion", action="store_true", help="plain completion prompt, no chat template")
    parser.add_argument(
        "--answer-prefix",
        help="with --completion: the start of the answer sentence the prompt ends with, as RULER does for base "
        "models (default for the demo: its needle's; otherwise none)",
    )
    parser.add_argument(
        "--show-selection", action="store_true", help="print the kept text spans and the dropped runs between them"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from cli.commands.common import load_engine
    from contract.needles import build_case
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    # Check the user's input before the (slow) model load, so mistakes fail at once.
    if args.answer_prefix is not None and not args.completion:
        raise ValueError("--answer-prefix needs --completion (a chat template starts the answer itself)")
    context = read_context(args)
    engine = load_engine(args)
    expected = None
    if context is not None:
        user_text = f"{context}\n\nQuestion: {args.question}"
    else:
        case = build_case(
            DEMO_TOKENS,
            depth=DEMO_DEPTH,
            seed=DEMO_SEED,
            count_tokens=lambda s: len(engine.encode_prompt(s)),
            needle=DEMO_NEEDLE,
        )
        expected = case.needle
        user_text = case.user_message() if not args.question else f"{case.document}\n\nQuestion: {args.question}"
    if args.completion:
        prefix = args.answer_prefix
        if prefix is None and expected is not None and not args.question:
            prefix = DEMO_ANSWER_PREFIX
        prompt_ids = engine.encode_prompt(user_text + "\nAnswer:" + (f" {prefix}" if prefix else ""))
    else:
        prompt_ids = engine.encode_chat([{"role": "user", "content": user_text}])

    # Only the options given: a knob the method lacks is refused even when null.
    given = {"budget": args.budget, "ratio": args.ratio, "layer": args.layer}
    knobs: dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    knobs.update(parse_knobs(args.knob))
    attention = knobs.pop("attention", None)
    attention_knobs = parse_knobs(args.attention_knob)
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        ),
        compression=CompressionSpec(
            method=args.method,
            knobs=knobs,
            return_selection=args.show_selection,
            attention=attention,
            attention_knobs=attention_knobs,
        ),
    )
    result = engine.generate(request)
    found = expected.found_in(result.text) if expected else None
    if args.json:
        out = {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "dtype": engine.dtype,
            "compression": result.compression.model_dump(exclude_none=True),
            "metrics": result.metrics.model_dump(),
        }
        if expected:
            out["demo"] = {"question": expected.question, "answer": expected.answer, "found": found}
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if expected:
        print(f"Q: {expected.question}  (demo haystack, expected answer: {expected.answer})")
    print(result.text.strip())
    print()
    print(format_cost_table(result, engine.dtype))
    if args.show_selection and result.compression.selection:
        from server.engine.spans import format_segments

        print("\nthe prompt, kept spans as [start:end] and what was dropped between them:")
        print(format_segments(result.compression.selection))
    if expected:
        print(f"\nneedle answer {'FOUND' if found else 'NOT found'} in the output")
    return 0


def read_context(args: argparse.Namespace) -> str | None:
    if args.context_file is None:
        return None
    if not args.context_file.is_file():
        raise FileNotFoundError(f"context file '{args.context_file}' does not exist")
    if not args.question:
        raise ValueError("give a question after --context-file")
    return args.context_file.read_text(encoding="utf-8", errors="replace")


def attention_rows(report: CompressionInfo) -> list[tuple[str, str]]:
    rows = []
    for label, info in (("filter attention", report.filter_attention), ("attention", report.attention)):
        if info:
            rows.append((label, f"{info.backend}, density {info.density:.3f} of causal pairs"))
    return rows


def format_cost_table(result: GenerationResult, dtype: str | None = None) -> str:
    c, m = result.compression, result.metrics
    rows = [
        *([("dtype", dtype)] if dtype else []),
        ("method", c.method + (f" (layer {c.layer})" if c.layer is not None else "")),
        *([("filter dtype", c.filter_dtype)] if c.filter_dtype else []),
        ("prompt tokens", f"{c.prompt_tokens}"),
        ("kept tokens", f"{c.kept_tokens} ({c.ratio:.1%})" + (f", {c.skipped}" if c.skipped else "")),
        *([("kept, any KV head", f"{c.kept_tokens_union} positions")] if c.kept_tokens_union is not None else []),
        *attention_rows(c),
        ("select", f"{m.select_ms:.0f} ms"),
        ("prefill", f"{m.prefill_ms:.0f} ms"),
        ("TTFT", f"{m.ttft_ms:.0f} ms"),
        ("decode", f"{result.completion_tokens} tokens, {m.output_tokens_per_s:.1f} tokens/s"),
        ("KV cache", f"{m.kv_cache_bytes / 2**20:.1f} MiB after prefill"),
        ("peak memory", f"{m.peak_memory_bytes / 2**20:.0f} MiB ({m.memory_source})"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"  {label:<{width}}  {value}" for label, value in rows)
