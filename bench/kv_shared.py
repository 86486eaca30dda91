"""Needle accuracy and decode speed of every KV method from one prefill per prompt.

On a heavily shared CPU the engine benchmark (bench/kv_methods.py: one full request per method,
each in a fresh process) cannot cover many configurations. Every KV pruner prefills the same
full prompt, so this script prefills each needle prompt once with all the methods' scoring
probes active together, then for each (method, budget) copies the full cache, runs the method's
``compress`` and greedy decode through the engine's own ``decode_one_token`` (the same hook calls
as a request: decode_observer / after_decode_step), and records whether the needle was found,
the KV bytes after pruning, and the decode time of ``--max-tokens`` tokens with ``ignore_eos``.
Decode timings of all methods on one prompt are taken back to back in one process, so their
ratio compares methods even when absolute speed is noisy. TTFT is not measured here (see
bench/kv_methods.py). GemFilter is not a KV method and runs through ``engine.generate``.

Writes bench/results/kv_shared_<model>.json after every prompt.

    python -m bench.kv_shared --length 4096 --budgets 256 1024 --depths 3
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

import server.engine.hf as hf_engine
from bench.common import (
    RESULTS_DIR,
    figure,
    machine_description,
    model_slug,
    needle_prompt,
    replace_doc_section,
    write_json,
)
from bench.kv_methods import tokens_before_eos
from compressors import build_method
from compressors.base import Attachment, KVAttachment, cache_bytes, keep_everything
from compressors.kv_pruner import ScoredKVPruner
from compressors.kv_scoring import LayerScores, collect_layer_scores
from compressors.probe import attention_probe
from server.engine.hf import HFEngine
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
from server.measure import PeakMemoryMeter
from server.models import load_model

KV_METHODS = ["snapkv", "h2o", "streamingllm", "pyramidkv"]


@contextmanager
def all_scorers(methods: list[ScoredKVPruner]) -> Iterator[list[LayerScores | None]]:
    """One prefill feeds every method's scorer: the probes are chained in a single probe."""
    probes = []
    collected: list[LayerScores | None] = []
    with ExitStack() as stack:
        for method in methods:
            scorer = method.layer_scorer()
            if scorer is None:
                collected.append(None)
                continue
            # collect_layer_scores installs its probe in the context var; capture and chain it.
            scores = stack.enter_context(collect_layer_scores(scorer))
            from compressors.probe import active_probe

            probes.append(active_probe())
            collected.append(scores)

        def chained(module, query, key, value) -> None:
            for probe in probes:
                probe(module, query, key, value)

        with attention_probe(chained):
            yield collected


def decode(engine: HFEngine, cache: DynamicCache, hooks: Attachment, logits: torch.Tensor, n: int, steps: int):
    tokens = [int(logits.argmax())]
    started = time.perf_counter()
    for step in range(steps - 1):
        logits = engine.decode_one_token(tokens[-1], cache, n + step, hooks)
        tokens.append(int(logits.argmax()))
    return tokens, time.perf_counter() - started


def run_prompt(engine: HFEngine, prompt, budgets: list[int], steps: int) -> list[dict[str, Any]]:
    ids = torch.tensor([prompt.prompt_ids])
    n = ids.shape[1]
    methods = {(name, b): build_method(name, {"budget": b}) for name in KV_METHODS for b in budgets}
    cache = DynamicCache(config=engine.model.config)
    started = time.perf_counter()
    with torch.inference_mode(), all_scorers(list(methods.values())) as collected:
        logits = engine.forward(ids, cache, 0)
    prefill_s = time.perf_counter() - started
    rows = []
    full_bytes = cache_bytes(cache)

    def record(name: str, budget: int | None, tokens: list[int], seconds: float, kv: int) -> None:
        answer = engine.decode(tokens_before_eos(tokens, engine.eos_token_ids))
        rows.append(
            {
                "method": name,
                "budget": budget,
                "depth": prompt.case.depth,
                "prompt_tokens": n,
                "found": prompt.case.needle.found_in(answer),
                "answer": answer.strip()[:100],
                "expected": prompt.case.needle.answer,
                "kv_bytes_after_prefill": kv,
                "kv_share_of_full": kv / full_bytes,
                "decode_tokens_per_s": (steps - 1) / seconds if seconds > 0 else None,
                "shared_prefill_s": prefill_s,
            }
        )

    with torch.inference_mode():
        work = copy.deepcopy(cache)
        tokens, seconds = decode(engine, work, Attachment(ids, keep_everything("none", n)), logits, n, steps)
        record("none", None, tokens, seconds, full_bytes)
        for ((name, budget), method), scores in zip(methods.items(), collected, strict=True):
            work = copy.deepcopy(cache)
            with method.attach(engine.model, ids, work, engine.default_budget, engine.tokenizer) as hooks:
                assert isinstance(hooks, KVAttachment)
                # Prune the shared prefill's copy with this method's own scores, as the engine would have.
                hooks.adopt_prefill(full_bytes, scores)
                kv = cache_bytes(work)
                tokens, seconds = decode(engine, work, hooks, logits, n, steps)
            record(name, budget, tokens, seconds, kv)
            del work
        for budget in budgets:
            sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
            result = engine.generate(
                GenerationRequest(prompt.prompt_ids, sampling, CompressionSpec("gemfilter", {"budget": budget}))
            )
            record("gemfilter", budget, result.token_ids, 0.0, result.metrics.kv_cache_bytes)
            rows[-1]["decode_tokens_per_s"] = result.metrics.output_tokens_per_s
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["budget"]), []).append(row)
    out = []
    for (method, budget), group in groups.items():
        speeds = sorted(r["decode_tokens_per_s"] for r in group if r["decode_tokens_per_s"])
        out.append(
            {
                "method": method,
                "budget": budget,
                "accuracy": sum(r["found"] for r in group) / len(group),
                "needles": len(group),
                "kv_share_of_full": sum(r["kv_share_of_full"] for r in group) / len(group),
                "median_decode_tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            }
        )
    return out


DOC_HEADING = "## KV-cache methods: needle accuracy, KV bytes, decode speed (issue 7)"


def plot(data: dict[str, Any], path: Path) -> None:
    rows = [r for r in data["summary"] if r["method"] != "none"]
    full = next(r for r in data["summary"] if r["method"] == "none")
    labels = [f"{r['method']}\n{r['budget']}" for r in rows]
    with figure(path, 1, 2, figsize=(13, 4)) as (_fig, axes):
        axes[0].bar(labels, [r["accuracy"] for r in rows])
        axes[0].axhline(full["accuracy"], color="k", linestyle="--", label="full attention")
        axes[0].set_title(f"needle accuracy, {data['settings']['length']}-token prompts")
        axes[0].legend()
        axes[1].bar(labels, [r["median_decode_tokens_per_s"] or 0 for r in rows])
        axes[1].axhline(full["median_decode_tokens_per_s"], color="k", linestyle="--", label="full attention")
        axes[1].set_title("decode tokens/s (median over prompts; shared CPU)")
        axes[1].legend()
        for ax in axes:
            ax.tick_params(axis="x", labelsize=7)


def markdown_section(data: dict[str, Any], kvpress: dict[str, Any] | None) -> str:
    settings, machine = data["settings"], data["machine"]
    lines = [
        DOC_HEADING,
        "",
        f"`python -m bench.kv_shared --length {settings['length']} --budgets "
        f"{' '.join(map(str, settings['budgets']))} --depths {settings['depths']}` with OMP_NUM_THREADS=1, "
        f"SmolLM2-135M-Instruct fp32 on {machine['cpu']} ({machine['cpu_cores']} cores), greedy, "
        f"{settings['max_tokens']} tokens with ignore_eos. One prefill per needle prompt feeds every KV method "
        "(their scoring probes chained), then each method prunes a copy of the full cache and decodes through "
        "the engine's hooks. The CPU was heavily shared with other jobs (load average "
        f"{machine['loadavg_1_5_15']}), so decode tokens/s are noisy; methods on one prompt ran back to back. "
        "KV share = exact cache-tensor bytes after pruning / full. Accuracy = needles found / asked.",
        "",
        "| method | budget | accuracy | needles | KV share of full | decode tok/s (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["summary"]:
        speed = f"{r['median_decode_tokens_per_s']:.2f}" if r["median_decode_tokens_per_s"] else "-"
        lines.append(
            f"| {r['method']} | {r['budget'] or '-'} | {r['accuracy']:.2f} | {r['needles']} "
            f"| {r['kv_share_of_full']:.3f} | {speed} |"
        )
    if kvpress:
        lines += ["", "kvpress on the same prompts and kept tokens (bench/kvpress_compare.py, own venv):", ""]
        lines += ["| kvpress press | budget | accuracy |", "|---|---:|---:|"]
        for key, accuracy in sorted(kvpress.get("accuracy", {}).items()):
            press, budget = key.rsplit("-", 1)
            lines.append(f"| {press} | {budget} | {accuracy:.2f} |")
    lines += ["", f"Data: `bench/results/kv_shared_smollm2_{settings['length']}.json`, plot: same name `.png`.", ""]
    return "\n".join(lines)


def render(length: int) -> None:
    path = RESULTS_DIR / f"kv_shared_smollm2_{length}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    kvpress_path = RESULTS_DIR / "kvpress_compare.json"
    kvpress = json.loads(kvpress_path.read_text(encoding="utf-8")) if kvpress_path.is_file() else None
    if kvpress is not None and "accuracy" not in kvpress:
        from bench.kvpress_compare import summary

        kvpress["accuracy"] = summary(kvpress["runs"])
    plot(data, path.with_suffix(".png"))
    replace_doc_section(DOC_HEADING, markdown_section(data, kvpress))


def main() -> None:
    from contract.needles import depths

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--depths", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7, help="same seeds as bench/kv_methods.py")
    parser.add_argument("--render", action="store_true", help="only re-render PNG + docs from the JSON")
    args = parser.parse_args()
    if args.render:
        render(args.length)
        return
    # As in bench/kv_methods.py: a 2 ms RSS sampler stalls decode on a shared CPU (GIL hand-offs).
    hf_engine.PeakMemoryMeter = functools.partial(PeakMemoryMeter, interval_s=0.02)  # type: ignore[misc]
    engine = HFEngine(load_model(args.model, device="cpu"))
    out = RESULTS_DIR / f"kv_shared_{model_slug(args.model)}_{args.length}.json"
    data: dict[str, Any] = {"machine": machine_description(), "settings": vars(args), "runs": []}
    for index, depth in enumerate(depths(args.depths)):
        prompt = needle_prompt(engine, args.length, depth, seed=args.seed + index)
        data["runs"] += run_prompt(engine, prompt, args.budgets, args.max_tokens)
        data["summary"] = summarise(data["runs"])
        data["machine"]["loadavg_1_5_15"] = machine_description()["loadavg_1_5_15"]
        write_json(out, data)
        print(json.dumps(data["summary"]), flush=True)


if __name__ == "__main__":
    main()
