"""``gemserve calibrate --model M``: pick GemFilter's filter layer for a model, write its profile.

Needle probes (``niah_single`` of :mod:`evals.tasks`) over several haystack kinds, lengths and
depths. For each probe, ONE forward over the whole prompt records GemFilter's score at every
layer through the attention probe (no cache, stopping after the last candidate layer), then
GemFilter's own selection (pooling, protected tail, span) keeps the top-k at each budget. The
recall is the fraction of the needle's answer tokens that survive.

The layer is the EARLIEST candidate whose mean answer recall at ``--metric-budget`` is within
``--tolerance`` of the best candidate's: the filter pass costs about ``(r + 1) / L`` of a full
prefill, so an earlier layer is faster at the same recall. For models that mix sliding-window
and global layers (Gemma 3) only global layers are candidates: a sliding layer is trained to look
at its local window and cannot rank far-away tokens. The profile also records the smallest
budget that kept ``--budget-recall`` of the answers at that layer, and the pays-off ratio (the
cost model ``L / (L - r - 1)`` unless ``--payoff-ratio`` gives a measured one, e.g. from
``bench/filter_payoff.py``). Writes the profile JSON (default: the cache, keyed by the model's
files, where ``gemserve serve`` and ``generate`` find it) and a PNG of recall per layer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from evals.haystacks import HAYSTACKS, TUNING_HAYSTACKS
from evals.runner import csv_list, depth_list, int_list
from evals.tasks import build_sample, sample_seed
from server.settings import add_dtype_arguments

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compressors.gemfilter import GemFilter
    from evals.targets import InProcessTarget


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, .gguf file or HF model dir")
    parser.add_argument("--device", default="auto")
    add_dtype_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, help="where converted models and cached profiles live")
    parser.add_argument("--lengths", type=int_list, default=[2048, 4096, 8000], help="probe lengths in tokens")
    parser.add_argument(
        "--haystacks",
        type=csv_list,
        default=list(TUNING_HAYSTACKS),
        help="haystack kinds to probe (default: the tuning families)",
    )
    parser.add_argument("--depths", type=depth_list, default=depth_list("3"), help="a count or a list of depths")
    parser.add_argument("--budgets", type=int_list, default=[256, 512, 1024, 2048], help="top-k budgets to score")
    parser.add_argument("--metric-budget", type=int, default=1024, help="the budget the layer is chosen at")
    parser.add_argument("--tolerance", type=float, default=0.03, help="recall below the best still accepted")
    parser.add_argument("--budget-recall", type=float, default=0.9, help="recall the recommended budget must keep")
    parser.add_argument("--layers", type=int_list, help="candidate layers (default: every global-attention layer)")
    parser.add_argument("--payoff-ratio", type=float, help="a measured pays-off ratio to record (bench.filter_payoff)")
    parser.add_argument("--payoff-source", default="bench/filter_payoff.py", help="where --payoff-ratio comes from")
    parser.add_argument("--seed", type=int, default=7000)
    parser.add_argument("--output", type=Path, help="profile path (default: the cache, keyed by the model's files)")


def candidate_layers(config: Any, requested: list[int] | None) -> list[int]:
    text_config = config.get_text_config()
    num_layers = int(text_config.num_hidden_layers)
    if requested:
        bad = [layer for layer in requested if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"--layers {bad}: this model has layers 0..{num_layers - 1}")
        return sorted(set(requested))
    kinds = getattr(text_config, "layer_types", None) or []
    # A model with no global layer at all (every layer slides) falls back to every layer, as
    # GemFilter's default layer does (compressors.gemfilter.default_filter_layer).
    global_layers = [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    return global_layers or list(range(num_layers))


def layer_scores(model: nn.Module, prompt_ids: list[int], method: GemFilter, last_layer: int) -> list[torch.Tensor]:
    """One forward (no cache); GemFilter's score of every token at every layer ``0..last_layer``,
    stopping the pass there like GemFilter does."""
    import torch

    from compressors.gemfilter import token_scores
    from compressors.probe import StopForward, attention_probe

    scores: list[torch.Tensor | None] = [None] * (last_layer + 1)

    def record(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        scores[module.layer_idx] = token_scores(module, query, key, method.scoring, method.window)
        if module.layer_idx == last_layer:
            raise StopForward

    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    with torch.inference_mode(), attention_probe(record), contextlib.suppress(StopForward):
        model.base_model(input_ids=ids, use_cache=False)
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise RuntimeError(f"the probe saw no attention call for layers {missing}")
    return [s for s in scores if s is not None]


def probe(
    target: InProcessTarget, style: str, method: GemFilter, layers: list[int], budgets: list[int], cell: tuple
) -> dict[str, Any]:
    """One needle prompt: answer-token recall per candidate layer and budget."""
    import torch

    haystack, length, depth, seed = cell
    sample = build_sample("niah_single", haystack, length, depth, seed, lambda s: target.count_tokens(s, style))
    ids = target.encode(sample, style)
    answer = target.answer_positions(sample, style, ids)
    if not answer:
        raise RuntimeError(f"could not locate the needle's answer tokens in {sample.uid}")
    started = time.perf_counter()
    scores = layer_scores(target.engine.model, ids, method, max(layers))
    input_ids = torch.tensor([ids])
    recall: dict[str, list[float]] = {}
    for budget in budgets:
        keep = min(budget, len(ids))
        per_layer = []
        for layer in layers:
            kept = set(method.choose(scores[layer], keep, input_ids, target.engine.tokenizer))
            per_layer.append(round(sum(p in kept for p in answer) / len(answer), 4))
        recall[str(budget)] = per_layer
    return {
        "uid": sample.uid,
        "haystack": haystack,
        "target_tokens": length,
        "prompt_tokens": len(ids),
        "depth": depth,
        "answer": sample.answers[0],
        "forward_s": round(time.perf_counter() - started, 2),
        "recall": recall,
    }


def mean_recall(probes: list[dict[str, Any]], budget: int) -> list[float]:
    rows = [p["recall"][str(budget)] for p in probes]
    return [round(mean(row[i] for row in rows), 4) for i in range(len(rows[0]))]


def choose(layers: list[int], recall: list[float], tolerance: float) -> int:
    best = max(recall)
    return next(layer for layer, value in zip(layers, recall, strict=True) if value >= best - tolerance)


def run(args: argparse.Namespace) -> int:
    from compressors.gemfilter import GemFilter
    from compressors.profile import ModelProfile, architecture_key, write_profile
    from evals.targets import InProcessTarget
    from server.engine.hf import HFEngine
    from server.model_profiles import cached_profile_path
    from server.models import default_cache_dir, load_model

    if args.metric_budget not in args.budgets:
        raise ValueError(f"--metric-budget {args.metric_budget} must be one of --budgets {args.budgets}")
    unknown = [h for h in args.haystacks if h not in HAYSTACKS]
    if unknown:
        raise ValueError(f"unknown haystack {', '.join(unknown)}; haystacks: {', '.join(HAYSTACKS)}")
    loaded = load_model(
        args.model, device=args.device, cache_dir=args.cache_dir, dtype=args.dtype, filter_dtype=args.filter_dtype
    )
    target = InProcessTarget(HFEngine(loaded))
    config = loaded.model.config
    layers = candidate_layers(config, args.layers)
    style = "chat" if loaded.tokenizer.chat_template is not None else "completion"
    method = GemFilter()
    cells = [
        (haystack, length, depth, sample_seed(args.seed, haystack, length, depth))
        for length in args.lengths
        for haystack in args.haystacks
        for depth in args.depths
    ]
    probes = [probe(target, style, method, layers, args.budgets, cell) for cell in tqdm(cells, desc="calibrate")]
    overall = mean_recall(probes, args.metric_budget)
    chosen = choose(layers, overall, args.tolerance)
    at = layers.index(chosen)
    by_budget = {str(b): mean_recall(probes, b)[at] for b in args.budgets}
    budget = next((b for b in sorted(args.budgets) if by_budget[str(b)] >= args.budget_recall), None)
    num_layers = int(config.get_text_config().num_hidden_layers)
    payoff = args.payoff_ratio
    profile = ModelProfile(
        model=loaded.name,
        architecture=architecture_key(config),
        filter_layer=chosen,
        payoff_ratio=round(payoff if payoff is not None else num_layers / max(1, num_layers - chosen - 1), 3),
        budget=budget,
        payoff_source=args.payoff_source
        if payoff is not None
        else f"cost model L/(L-r-1) = {num_layers}/{num_layers - chosen - 1}",
        calibration={
            "rule": f"earliest candidate with mean answer recall@{args.metric_budget} >= best - {args.tolerance}",
            "method": {"scoring": method.scoring, "window": method.window, "span": method.span, "tail": method.tail},
            "style": style,
            "candidate_layers": layers,
            "lengths": args.lengths,
            "haystacks": args.haystacks,
            "depths": args.depths,
            "mean_answer_recall": {str(b): mean_recall(probes, b) for b in args.budgets},
            "by_length": {
                str(n): mean_recall([p for p in probes if p["target_tokens"] == n], args.metric_budget)
                for n in args.lengths
            },
            "chosen_layer_recall": by_budget,
            "probes": probes,
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    )
    out = args.output or cached_profile_path(args.cache_dir or default_cache_dir(), loaded.path)
    write_profile(profile, out)
    plot(profile, out.with_suffix(".png"), args.metric_budget)
    print(recall_table(profile, args.metric_budget))
    print(
        f"\nfilter layer {chosen} ({profile.calibration['rule']}); budget {budget}; payoff ratio {profile.payoff_ratio}"
    )
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def recall_table(profile: Any, metric_budget: int) -> str:
    calibration = profile.calibration
    budgets = list(calibration["mean_answer_recall"])
    lengths = list(calibration["by_length"])
    header = ["layer", *(f"k={b}" for b in budgets), *(f"{n} tok @k={metric_budget}" for n in lengths)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for i, layer in enumerate(calibration["candidate_layers"]):
        cells = [f"{calibration['mean_answer_recall'][b][i]:.2f}" for b in budgets]
        cells += [f"{calibration['by_length'][n][i]:.2f}" for n in lengths]
        mark = " *" if layer == profile.filter_layer else ""
        lines.append(f"| {layer}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(profile: Any, path: Path, metric_budget: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calibration = profile.calibration
    layers = calibration["candidate_layers"]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for budget, values in calibration["mean_answer_recall"].items():
        ax.plot(layers, values, "-o", markersize=4, label=f"answer recall, top {budget}")
    for length, values in calibration["by_length"].items():
        ax.plot(layers, values, ":", label=f"~{length} tokens, top {metric_budget}")
    ax.axvline(profile.filter_layer, color="grey", linewidth=1)
    ax.annotate(
        f"chosen: layer {profile.filter_layer}", (profile.filter_layer, 0.05), xytext=(4, 0), textcoords="offset points"
    )
    ax.set_xlabel("filter layer r")
    ax.set_ylabel("needle answer tokens kept by GemFilter")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"GemFilter calibration: {profile.model} ({len(calibration['probes'])} needle probes)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
