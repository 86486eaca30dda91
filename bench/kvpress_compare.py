"""NVIDIA kvpress on the same model, prompts and kept-token budgets as bench/kv_methods.py.

Runs from its own venv (kvpress pins an older transformers; never a project dependency):

    python3 -m venv .venv-kvpress
    .venv-kvpress/bin/pip install torch==2.13.0 kvpress
    .venv-kvpress/bin/python bench/kvpress_compare.py --budgets 1024

Prompts: contract/needles.py ``build_case`` with the same target length, depths and seeds as
bench/kv_methods.py (token counts from the same tokenizer files). How the question is placed:
kvpress's pipeline compresses ``context`` and appends each question uncompressed. GemServe
compresses the whole prompt, question included, so here the *whole user message* (document and
question) is passed as kvpress's context and the question is empty: kvpress then compresses the
same text we do and only appends the chat template's assistant prefix (a few tokens). Kept tokens
match GemServe's budget: ``compression_ratio = 1 - budget / context_tokens``. Presses: SnapKVPress
(window 32, as ours), StreamingLLMPress (4 sinks) and ObservedAttentionPress (H2O-style score from
eager attention weights; kvpress has no decode-time eviction for it). Greedy, 32 new tokens.

Writes bench/results/kvpress_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from contract.needles import build_case, depths  # noqa: E402  (stdlib-only module of this repo)

MODEL_GLOB = "SmolLM2-135M-Instruct.Q4_1-*"
OUT_PATH = REPO_ROOT / "bench" / "results" / "kvpress_compare.json"


def model_dir() -> Path:
    cache = Path(os.environ.get("GEMSERVE_CACHE_DIR", Path.home() / ".cache" / "gemserve"))
    found = sorted((cache / "models").glob(MODEL_GLOB))
    if not found:
        raise SystemExit(f"no converted SmolLM2 dir under {cache / 'models'}: run `gemserve generate` once first")
    return found[0]


def make_press(name: str, ratio: float) -> Any:
    from kvpress import ObservedAttentionPress, SnapKVPress, StreamingLLMPress

    if name == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=32)
    if name == "streamingllm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "observed_attention":
        return ObservedAttentionPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}")


def load(path: Path, attn: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn).eval()
    return model, tokenizer


def token_counter(tokenizer: Any) -> Any:
    """Tokens of a text with special tokens, as GemServe's ``engine.encode_prompt`` counts them."""
    return lambda text: len(tokenizer(text)["input_ids"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    import kvpress
    import torch
    import transformers
    from transformers import pipeline

    path = model_dir()
    results: dict[str, Any] = {
        "machine": {
            "cpu_cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": getattr(kvpress, "__version__", "unknown"),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": vars(args),
        "question_placement": "whole user message (document + question) compressed as kvpress context; empty "
        "question; only the chat template's assistant prefix is appended uncompressed",
        "runs": [],
    }
    for press_name in args.presses:
        model, tokenizer = load(path, "eager" if press_name == "observed_attention" else "sdpa")
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
        count = token_counter(tokenizer)
        for index, depth in enumerate(depths(args.depths)):
            case = build_case(args.length, depth, seed=args.seed + index, count_tokens=count)
            context = case.user_message()
            context_tokens = count(context)
            for budget in args.budgets:
                ratio = max(0.0, 1.0 - budget / context_tokens)
                started = time.perf_counter()
                with torch.inference_mode():
                    answer = pipe(context, question="", press=make_press(press_name, ratio), max_new_tokens=32)[
                        "answer"
                    ]
                results["runs"].append(
                    {
                        "press": press_name,
                        "budget": budget,
                        "depth": depth,
                        "context_tokens": context_tokens,
                        "compression_ratio": ratio,
                        "kept_tokens": context_tokens - int(context_tokens * ratio),
                        "found": case.needle.found_in(answer),
                        "answer": answer.strip()[:120],
                        "expected": case.needle.answer,
                        "seconds": time.perf_counter() - started,
                    }
                )
                print(json.dumps(results["runs"][-1]), flush=True)
                write(results)
    results["accuracy"] = summary(results["runs"])
    write(results)
    return results


def summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    table: dict[str, list[bool]] = {}
    for run_ in runs:
        table.setdefault(f"{run_['press']}-{run_['budget']}", []).append(run_["found"])
    return {key: sum(found) / len(found) for key, found in table.items()}


def write(results: dict[str, Any]) -> None:
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024])
    parser.add_argument("--depths", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7, help="same as bench/kv_methods.py")
    parser.add_argument("--presses", nargs="+", default=["snapkv", "streamingllm", "observed_attention"])
    run(parser.parse_args())


if __name__ == "__main__":
    main()
