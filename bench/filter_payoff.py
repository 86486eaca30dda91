"""Where GemFilter starts to pay (issue 11): the prompt length / budget ratio at which the filter
pass plus the prefill of the kept tokens costs as much as prefilling the whole prompt.

One process; per prompt length, ``none`` and GemFilter (``payoff_ratio=0``: always filter) answer
the same prompt alternately (``--repeats`` times each, order swapped each time); the TTFT ratio
gemfilter / none is the median over the pairs. The break-even ratio is where that curve crosses 1
(linear interpolation in n/k), and is what the model's profile records as ``payoff_ratio``
(``gemserve calibrate --payoff-ratio``, server/profiles/). Writes bench/results/filter_payoff_<model>.json.

    python -m bench.filter_payoff --budget 1024 --ratios 1.2,1.6,2.0,2.4,2.8,3.2
"""

from __future__ import annotations

import argparse
import itertools
import os
from statistics import median
from typing import Any

from bench.attention import needle_cases
from bench.common import RESULTS_DIR, model_slug, result_header, write_json


def ttft(engine: Any, ids: list[int], method: str, knobs: dict[str, Any]) -> float:
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    request = GenerationRequest(
        prompt_ids=ids,
        sampling=SamplingParams(max_tokens=1, temperature=0.0),
        compression=CompressionSpec(method, knobs),
    )
    return engine.generate(request).metrics.ttft_ms


def break_even(points: list[tuple[float, float]]) -> float | None:
    """First n/k where the ratio curve crosses 1, interpolated; None when it never does."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y0 >= 1.0 > y1:
            return round(x0 + (y0 - 1.0) * (x1 - x0) / (y0 - y1), 2)
    return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from server.engine.hf import HFEngine
    from server.models import load_model

    torch.set_num_threads(args.threads)
    engine = HFEngine(load_model(args.model, device="cpu"))
    chat = engine.tokenizer.chat_template is not None
    knobs = {"budget": args.budget, "payoff_ratio": 0, "filter_attention": args.filter_attention}
    result: dict[str, Any] = {
        **result_header(engine.model_name),
        "budget": args.budget,
        "filter_attention": args.filter_attention,
        "rows": [],
    }
    warm = needle_cases(engine, 600, [0.5], 1, chat)[0].prompt_ids
    ttft(engine, warm, "none", {})
    ttft(engine, warm, "gemfilter", {**knobs, "budget": 128})
    for ratio in args.ratios:
        ids = needle_cases(engine, int(ratio * args.budget), [0.5], 7, chat)[0].prompt_ids
        pairs = []
        for repeat in range(args.repeats):
            order = [("none", {}), ("gemfilter", knobs)]
            times = {}
            for method, method_knobs in order if repeat % 2 == 0 else order[::-1]:
                times[method] = ttft(engine, ids, method, method_knobs)
            pairs.append(times)
        ratios = [p["gemfilter"] / p["none"] for p in pairs]
        row = {"n_over_k": round(len(ids) / args.budget, 3), "tokens": len(ids), "pairs": pairs}
        row["ttft_ratio_median"] = round(median(ratios), 3)
        result["rows"].append(row)
        print(f"n/k={row['n_over_k']:.2f} tokens={len(ids)} gemfilter/none={row['ttft_ratio_median']:.3f}", flush=True)
    result["break_even_n_over_k"] = break_even([(r["n_over_k"], r["ttft_ratio_median"]) for r in result["rows"]])
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    write_json(RESULTS_DIR / f"filter_payoff_{model_slug(engine.model_name)}.json", result)
    print(f"break-even n/k: {result['break_even_n_over_k']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument(
        "--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[1.2, 1.6, 2.0, 2.4, 2.8, 3.2]
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--filter-attention", default="dense")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
