"""Which decoder layer should GemFilter filter at? Needle recall in the top-k, per layer.

For each needle case, one forward over the whole prompt (no cache) records GemFilter's score
(``token_scores`` with the method's ``--scoring`` and ``--window``: by default the fused
score of the last 32 queries; ``--scoring inner_product --window 1`` is the paper's) at EVERY layer
through the attention probe, then applies GemFilter's own selection (pooling, protected tail,
top-k). Recall = the fraction of the needle's answer
tokens (and of its sentence's tokens) that survive. Writes
``bench/results/filter_layer_<model>.json`` and a PNG of recall vs layer.

The default layer is the EARLIEST layer whose mean answer recall@512 at the main length is
within ``--tolerance`` of the best layer's: the filter pass costs about ``(r + 1) / L`` of a full
prefill, so an earlier layer is faster at the same recall.

    python -m bench.calibrate_layer            # or: gemserve calibrate
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from bench.common import RESULTS_DIR, NeedlePrompt, machine_description, model_slug, needle_prompt, write_json
from clients.haystack import depths

if TYPE_CHECKING:  # torch and the model stack load in run(), so `gemserve --help` stays fast
    import torch
    from torch import nn

    from compressors.gemfilter import GemFilter

logger = logging.getLogger(__name__)

TOP_K = (256, 512)
METRIC = "answer@512"  # what the default layer is chosen on


def layer_scores(
    model: nn.Module, prompt_ids: list[int], method: GemFilter, last_layer: int | None = None
) -> list[torch.Tensor]:
    """One forward (no cache); GemFilter's ``(n,)`` score vector at every layer up to
    ``last_layer`` (default: all), stopping the pass there like GemFilter does."""
    import torch

    from compressors.gemfilter import token_scores
    from compressors.probe import (
        StopForward,
        attention_probe,
        decoder_layers,
        install_probe_attention,
        uses_probe_attention,
    )

    if not uses_probe_attention(model):
        install_probe_attention(model)
    num_layers = len(decoder_layers(model))
    last = num_layers - 1 if last_layer is None else last_layer
    scores: list[torch.Tensor | None] = [None] * (last + 1)

    def record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        scores[module.layer_idx] = token_scores(module, query, key, method.scoring, method.window)
        if module.layer_idx == last:
            raise StopForward

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    with torch.inference_mode(), attention_probe(record), contextlib.suppress(StopForward):
        model.base_model(input_ids=ids, use_cache=False)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise RuntimeError(f"the probe saw no attention call for layers {missing}")
    return [s for s in scores if s is not None]


def recall(kept: set[int], positions: list[int]) -> float:
    return sum(p in kept for p in positions) / len(positions) if positions else 0.0


def case_recalls(prompt: NeedlePrompt, scores: list[torch.Tensor], method: GemFilter) -> dict[str, list[float]]:
    """``{"answer@256": [per layer], "sentence@256": [...], ...}`` with GemFilter's own selection."""
    from compressors.gemfilter import pick_indices

    out: dict[str, list[float]] = {}
    n = len(prompt.prompt_ids)
    for k in TOP_K:
        kept_per_layer = [set(pick_indices(s, min(k, n), method.kernel_size, method.tail)) for s in scores]
        out[f"answer@{k}"] = [recall(kept, prompt.answer_token_positions) for kept in kept_per_layer]
        out[f"sentence@{k}"] = [recall(kept, prompt.needle_token_positions) for kept in kept_per_layer]
    return out


def calibrate_length(
    engine: Any,
    target_tokens: int,
    cases: int,
    seed: int,
    method: GemFilter,
    progress: tqdm,
    last_layer: int | None = None,
    on_case: Callable[[dict[str, Any]], None] | None = None,
    case_slice: slice = slice(None),
) -> dict[str, Any]:
    """Per-case and mean per-layer recalls over ``cases`` needles at spread depths and seeds
    (case ``i`` sits at ``depths(cases)[i]`` with seed ``seed + i``; ``case_slice`` picks some)."""
    entry: dict[str, Any] = {"target_tokens": target_tokens, "cases": [], "mean_recall": {}}
    for i, depth in list(enumerate(depths(cases)))[case_slice]:
        prompt = needle_prompt(engine, target_tokens, depth=depth, seed=seed + i)
        start = time.perf_counter()
        scores = layer_scores(engine.model, prompt.prompt_ids, method, last_layer)
        recalls = case_recalls(prompt, scores, method)
        entry["cases"].append(
            {
                "seed": seed + i,
                "depth": round(depth, 4),
                "prompt_tokens": len(prompt.prompt_ids),
                "needle": prompt.case.needle.sentence,
                "answer_tokens": len(prompt.answer_token_positions),
                "tail_tokens": prompt.tail_tokens,
                "forward_s": round(time.perf_counter() - start, 2),
                "recall": {key: [round(v, 4) for v in values] for key, values in recalls.items()},
            }
        )
        entry["mean_recall"] = mean_recalls(entry["cases"])
        progress.update(1)
        if on_case is not None:
            on_case(entry)
    return entry


def mean_recalls(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    keys = records[0]["recall"].keys()
    num_layers = len(next(iter(records[0]["recall"].values())))
    return {
        key: [round(mean(r["recall"][key][layer] for r in records), 4) for layer in range(num_layers)] for key in keys
    }


def choose_layer(mean_recall: dict[str, list[float]], metric: str, tolerance: float) -> int:
    """The earliest layer within ``tolerance`` of the best layer on ``metric``."""
    values = mean_recall[metric]
    best = max(values)
    return next(layer for layer, value in enumerate(values) if value >= best - tolerance)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    main = result["lengths"][0]
    layers = range(len(main["mean_recall"]["answer@512"]))
    for key, style in (("answer@512", "-o"), ("answer@256", "-s"), ("sentence@512", "--")):
        ax.plot(layers, main["mean_recall"][key], style, label=f"{key}, ~{main['target_tokens']} tokens", markersize=4)
    for check in result["lengths"][1:]:
        values = check["mean_recall"]["answer@512"]
        ax.plot(range(len(values)), values, ":o", label=f"answer@512, ~{check['target_tokens']} tokens", markersize=3)
    chosen = result["chosen_layer"]
    ax.axvline(chosen, color="grey", linewidth=1)
    ax.annotate(f"chosen: layer {chosen}", (chosen, 0.05), xytext=(4, 0), textcoords="offset points")
    ax.set_xlabel("filter layer r")
    ax.set_ylabel("needle recall in GemFilter's top-k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"GemFilter filter-layer calibration: {result['model']} ({len(main['cases'])} needles at main length)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, .gguf file or HF model dir")
    parser.add_argument("--tokens", type=int, default=4096, help="main prompt length (default 4096)")
    parser.add_argument("--cases", type=int, default=12, help="needle cases at the main length (default 12)")
    parser.add_argument(
        "--check-tokens", type=int, nargs="*", default=[2048, 8000], help="extra lengths to check (default 2048 8000)"
    )
    parser.add_argument("--check-cases", type=int, default=4, help="needle cases per extra length (default 4)")
    parser.add_argument("--check-margin", type=int, default=3, help="extra lengths score layers up to chosen + this")
    parser.add_argument("--seed", type=int, default=7000, help="first case's seed; case i uses seed + i")
    parser.add_argument("--tolerance", type=float, default=0.03, help="recall below the best still accepted")
    parser.add_argument(
        "--scoring", choices=("fused", "inner_product", "attention"), default="fused", help="GemFilter's scoring knob"
    )
    parser.add_argument("--window", type=int, default=32, help="GemFilter's window knob (1: the paper's last query)")
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/filter_layer_<model>.json)")
    parser.add_argument("--case-from", type=int, default=0, help="run only main cases from this index (a part)")
    parser.add_argument("--case-to", type=int, help="run only main cases before this index (a part)")
    parser.add_argument("--skip-main", action="store_true", help="run only the check lengths (a part)")
    parser.add_argument(
        "--check-last-layer", type=int, help="check lengths score layers 0..this (default chosen+margin)"
    )
    parser.add_argument("--merge", type=Path, nargs="+", help="measure nothing: combine part JSONs into --out")


def run(args: argparse.Namespace) -> int:
    if args.merge:
        return finalize(merge_results(args.merge), args.out or args.merge[0], args.tolerance)
    from compressors.gemfilter import GemFilter
    from compressors.probe import decoder_layers
    from server.engine.hf import HFEngine
    from server.models import load_model

    engine = HFEngine(load_model(args.model, device="cpu"))
    method = GemFilter(scoring=args.scoring, window=args.window)
    result: dict[str, Any] = {
        "model": engine.model_name,
        "num_layers": len(decoder_layers(engine.model)),
        "method": {
            "scoring": method.scoring,
            "window": method.window,
            "kernel_size": method.kernel_size,
            "tail": method.tail,
        },
        "main_tokens": args.tokens,
        "rule": f"earliest layer with mean {METRIC} at ~{args.tokens} tokens >= best - {args.tolerance}",
        "lengths": [],
    }
    out = args.out or RESULTS_DIR / f"filter_layer_{model_slug(engine.model_name)}.json"

    def save(entry: dict[str, Any]) -> None:
        """Write after every case, so a run cut short keeps what it measured."""
        if entry not in result["lengths"]:
            result["lengths"].append(entry)
        if not args.skip_main:
            result["chosen_layer"] = choose_layer(result["lengths"][0]["mean_recall"], METRIC, args.tolerance)
        result["complete"] = False
        result["machine"] = machine_description()
        write_json(out, result)

    main_cases = len(range(args.cases)[args.case_from : args.case_to])
    total = (0 if args.skip_main else main_cases) + args.check_cases * len(args.check_tokens)
    with tqdm(total=total, desc="calibrate", unit="case") as progress:
        if not args.skip_main:
            part = slice(args.case_from, args.case_to)
            calibrate_length(engine, args.tokens, args.cases, args.seed, method, progress, None, save, part)
        # Longer and shorter prompts only check layers up to the chosen one plus a margin: the
        # pass stops there, which keeps an 8K check affordable on a 2-core CPU.
        last = args.check_last_layer
        if last is None:
            last = min(result["num_layers"] - 1, result["chosen_layer"] + args.check_margin)
        for i, tokens in enumerate(args.check_tokens, start=1):
            calibrate_length(engine, tokens, args.check_cases, args.seed + 100 * i, method, progress, last, save)
    if args.skip_main or args.case_from or args.case_to is not None:
        print(f"wrote part of a calibration to {out}; combine the parts with --merge")
        return 0
    return finalize(result, out, args.tolerance)


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """Combine calibration parts run in separate processes: cases of equal length are pooled."""
    parts = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    merged = {key: value for key, value in parts[0].items() if key not in {"lengths", "chosen_layer"}}
    by_length: dict[int, dict[str, Any]] = {}
    for part in parts:
        for entry in part["lengths"]:
            pooled = by_length.setdefault(
                entry["target_tokens"], {"target_tokens": entry["target_tokens"], "cases": []}
            )
            seen = {case["seed"] for case in pooled["cases"]}
            pooled["cases"].extend(case for case in entry["cases"] if case["seed"] not in seen)  # parts may overlap
    main_tokens = merged.get("main_tokens", parts[0]["lengths"][0]["target_tokens"])
    order = sorted(by_length, key=lambda tokens: (tokens != main_tokens, tokens))
    merged["lengths"] = []
    for tokens in order:
        entry = by_length[tokens]
        entry["cases"].sort(key=lambda case: case["seed"])
        entry["mean_recall"] = mean_recalls(entry["cases"])
        merged["lengths"].append(entry)
    merged["merged_from"] = [str(path) for path in paths]
    return merged


def finalize(result: dict[str, Any], out: Path, tolerance: float) -> int:
    """Choose the layer, summarise the check lengths at it, write JSON + PNG, print the choice."""
    chosen = choose_layer(result["lengths"][0]["mean_recall"], METRIC, tolerance)
    result["chosen_layer"] = chosen
    result["chosen_layer_recall"] = {
        str(r["target_tokens"]): {key: values[chosen] for key, values in r["mean_recall"].items()}
        for r in result["lengths"]
        if chosen < len(next(iter(r["mean_recall"].values())))
    }
    result["max_tail_tokens"] = max(c["tail_tokens"] for r in result["lengths"] for c in r["cases"])
    result["complete"] = True
    result.setdefault("machine", machine_description())
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    print(f"chosen filter layer: {chosen} ({result['rule']})")
    for tokens, recalls in result["chosen_layer_recall"].items():
        print(f"  ~{tokens} tokens: " + ", ".join(f"{k}={v:.3f}" for k, v in recalls.items()))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.WARNING)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
