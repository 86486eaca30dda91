"""Prefill on a GPU: full attention vs GemFilter vs SnapKV at the paper's prompt lengths.

The GemFilter paper measures prefill time and memory on a GPU, at 8K-120K tokens, against SnapKV.
This is that measurement through GemServe's own engine (``HFEngine.generate``, the path a request
takes), on CUDA in bfloat16:

- the model is built from a **config with random weights** on the GPU: no checkpoint of that size
  can reach the machines this was run on, and neither time nor memory depends on the weights'
  values (selection quality does: it is measured elsewhere, on CPU, with real weights). The
  shapes are the real ones: SmolLM2-135M (our default) and Llama-3.1-8B (the paper's first model;
  its vocabulary is cut to the tokenizer's 49152 ids, which only touches the last token's logits);
- prompts are real chat-templated needle prompts (``contract.needles``), one per repeat;
- methods run interleaved per prompt (A, B, C, then B, C, A ...) inside one process, after a
  warm-up of each; the engine measures TTFT, the filter pass (``select_ms``), the prefill, the KV
  cache's bytes and the allocator's peak (``cuda:max_memory_allocated`` over the request).

Writes ``bench/results/gpu_prefill.json``, a PNG, and a table in docs/benchmarks.md.

    python -m bench.gpu_prefill --tokenizer DIR          # needs torch with CUDA
    python -m bench.gpu_prefill --from-json bench/results/gpu_prefill.json   # redraw, no GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from statistics import median
from typing import Any

from bench.common import (
    RESULTS_DIR,
    figure,
    needle_prompt,
    replace_doc_section,
    result_header,
    rotated,
    stamp_finish,
    write_json,
)
from contract.methods import MethodSpec, parse_methods

logger = logging.getLogger(__name__)

DOC_HEADING = "## Prefill on a GPU (random weights, real shapes)"
# name -> what differs from the tokenizer's own model config (SmolLM2-135M's).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"max_position_embeddings": 131072},
    "llama-3.1-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": False,
    },
}
# GemFilter at the default layer (half depth without a calibrated profile) and at layer 13, the
# paper's for Llama-3.1-8B.
DEFAULT_METHODS = ["none", "gemfilter:1024", "gemfilter:1024+layer=13", "snapkv:1024"]
DEFAULT_LENGTHS = [8192, 32768, 65536, 122880]


def build_engine(shape: str, tokenizer_dir: Path, device_name: str = "cuda") -> Any:
    """An HFEngine on ``device_name`` around a random-weight model of ``shape``, in ``--dtype auto``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from compressors.probe import install_probe_attention
    from server.engine.hf import HFEngine
    from server.models import LoadedModel
    from server.precision import pick_dtype

    device = torch.device(device_name)
    dtype = pick_dtype("auto", device)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with device:  # initialised on the GPU: an 8B model's random init on the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype.torch_dtype).eval()
    install_probe_attention(model)
    loaded = LoadedModel(
        name=shape,
        path=tokenizer_dir,
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
        max_model_len=config.max_position_embeddings,
        device=device,
        dtype=dtype,
    )
    return HFEngine(loaded)


def answer(engine: Any, spec: MethodSpec, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """One request through the engine; what it cost, as the engine measured it."""
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    request = GenerationRequest(list(prompt_ids), sampling, CompressionSpec(spec.name, spec.method_knobs()))
    result = engine.generate(request)
    metrics, compression = result.metrics, result.compression
    return {
        "method": spec.label,
        "prompt_tokens": result.prompt_tokens,
        "kept_tokens": compression.kept_tokens,
        "ttft_ms": metrics.ttft_ms,
        "select_ms": metrics.select_ms,
        "prefill_ms": metrics.prefill_ms,
        "kv_cache_bytes": metrics.kv_cache_bytes,
        "filter_layer": compression.layer,
        "peak_memory_bytes": metrics.peak_memory_bytes,
        "memory_baseline_bytes": metrics.memory_baseline_bytes,
        "memory_source": metrics.memory_source,
    }


def measure_shape(engine: Any, args: argparse.Namespace, specs: list[MethodSpec]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    # Warm up at the first length: below GemFilter's payoff length its filter pass would not run,
    # and a first filter pass on CUDA pays one-off costs (kernel selection, allocator growth).
    warm = needle_prompt(engine, min(args.lengths), depth=0.5, seed=args.seed - 1)
    for spec in specs:
        answer(engine, spec, warm.prompt_ids, args.max_tokens)
    turn = 0
    deadline = time.monotonic() + args.budget_s
    for length in args.lengths:
        if length > engine.loaded.max_model_len:
            continue
        for repeat in range(args.repeats):
            prompt = needle_prompt(engine, length, depth=(repeat + 0.5) / args.repeats, seed=args.seed + repeat)
            for spec in rotated(specs, turn):
                row = answer(engine, spec, prompt.prompt_ids, args.max_tokens)
                rows.append({**row, "length": length, "repeat": repeat})
                logger.info("%s %d %s ttft %.0f ms", engine.loaded.name, length, spec.label, row["ttft_ms"])
            turn += 1
            if time.monotonic() > deadline:
                logger.warning("time budget spent: stopping at %d tokens, repeat %d", length, repeat)
                return rows
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (model, length, method) and each method's TTFT ratio to ``none`` on the same prompts."""
    order = list(dict.fromkeys(r["method"] for r in rows))
    keys = sorted({(r["model"], r["length"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], order.index(k[2])))
    out = []
    for model, length, method in keys:
        group = [r for r in rows if (r["model"], r["length"], r["method"]) == (model, length, method)]
        base = [r for r in rows if (r["model"], r["length"], r["method"]) == (model, length, "none")]
        pairs = [(b["ttft_ms"], g["ttft_ms"]) for g in group for b in base if b["repeat"] == g["repeat"]]
        out.append(
            {
                "model": model,
                "length": length,
                "method": method,
                "n": len(group),
                "prompt_tokens": round(median(r["prompt_tokens"] for r in group)),
                "kept_tokens": median(r["kept_tokens"] for r in group),
                "ttft_ms": median(r["ttft_ms"] for r in group),
                "select_ms": median(r["select_ms"] for r in group),
                "filter_layer": group[0].get("filter_layer"),
                "peak_memory_gib": median(r["peak_memory_bytes"] for r in group) / 2**30,
                "over_baseline_gib": median(r["peak_memory_bytes"] - r["memory_baseline_bytes"] for r in group) / 2**30,
                "kv_cache_mib": median(r["kv_cache_bytes"] for r in group) / 2**20,
                "speedup_vs_none": median(b / g for b, g in pairs) if pairs else None,
            }
        )
    return out


def doc_section(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        DOC_HEADING,
        "",
        f"`python -m bench.gpu_prefill` on {machine['gpu']} (torch {machine['torch']}, transformers "
        f"{machine['transformers']}), {result['dtype']}, {result['started_at']}; "
        f"`bench/results/gpu_prefill.json`. Random weights in the real shapes (time and memory do not depend "
        f"on weight values; no checkpoint of these sizes reaches that machine), real chat-templated needle "
        f"prompts, methods interleaved per prompt in one process, {result['repeats']} prompts per length, "
        f"medians; `speedup` = median over prompts of none's TTFT / the method's on the same prompt. "
        f"Peak = the CUDA allocator's peak during the request (weights included); over baseline = that peak "
        f"less what was allocated when the request began (the weights).",
        "",
        "| model | prompt tokens | method | kept | TTFT ms | select ms | speedup vs none | peak GiB "
        "| over baseline GiB | KV MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        speedup = f"{row['speedup_vs_none']:.2f}x" if row["speedup_vs_none"] is not None else "-"
        lines.append(
            f"| {row['model']} | {row['prompt_tokens']} | {row['method']} | {row['kept_tokens']:.0f} | "
            f"{row['ttft_ms']:.0f} | {row['select_ms']:.0f} | {speedup} | {row['peak_memory_gib']:.2f} | "
            f"{row.get('over_baseline_gib', float('nan')):.2f} | {row['kv_cache_mib']:.0f} |"
        )
    for note in result.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    models = sorted({row["model"] for row in result["summary"]})
    with figure(path, 2, len(models), figsize=(6 * len(models), 8), squeeze=False) as (fig, axes):
        for column, model in enumerate(models):
            rows = [row for row in result["summary"] if row["model"] == model]
            for method in dict.fromkeys(row["method"] for row in rows):
                mine = [row for row in rows if row["method"] == method]
                lengths = [row["prompt_tokens"] for row in mine]
                axes[0][column].plot(lengths, [row["ttft_ms"] for row in mine], marker="o", label=method)
                axes[1][column].plot(lengths, [row["over_baseline_gib"] for row in mine], marker="o", label=method)
            axes[0][column].set_title(f"{model}: TTFT (ms)")
            axes[1][column].set_title(f"{model}: peak GPU memory over the weights (GiB)")
            for ax in axes[:, column]:
                ax.set_xlabel("prompt tokens")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"{result['machine']['gpu']}, {result['dtype']}, random weights")


def publish(result: dict[str, Any], out: Path, doc: bool) -> None:
    result["summary"] = summarise(result["rows"])
    write_json(out, result)
    plot(result, out.with_suffix(".png"))
    if doc:
        replace_doc_section(DOC_HEADING, doc_section(result))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_prefill: error: torch sees no CUDA GPU here (--device cpu for a smoke run)")
    specs = parse_methods(args.methods)
    result: dict[str, Any] = {**result_header(",".join(args.shapes)), "repeats": args.repeats, "rows": []}
    result["notes"] = args.note
    for shape in args.shapes:
        engine = build_engine(shape, args.tokenizer, args.device)
        rows = measure_shape(engine, args, specs)
        result["rows"] += [{**row, "model": shape} for row in rows]
        del engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
        publish(result, args.out, doc=False)  # a cut-short run keeps what it measured
    stamp_finish(result)
    publish(result, args.out, doc=not args.no_doc)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, help="a model dir holding SmolLM2's config and tokenizer")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method specs (gemserve eval's grammar)")
    parser.add_argument("--repeats", type=int, default=3, help="prompts per length (each at its own needle depth)")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script")
    parser.add_argument("--budget-s", type=float, default=240.0, help="per shape: stop starting new prompts after this")
    parser.add_argument("--seed", type=int, default=700)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_prefill.json")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--from-json", type=Path, help="redraw the PNG and the doc table from a saved run")
    parser.add_argument("--note", action="append", default=[], help="a line under the doc table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["notes"] = args.note or result.get("notes", [])
        publish(result, args.out, doc=not args.no_doc)
        return
    if args.tokenizer is None:
        parser.error("--tokenizer is required to measure")
    run(args)


if __name__ == "__main__":
    main()
