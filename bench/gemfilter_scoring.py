"""GemFilter's scorings compared on two haystack families: answer recall and real answers.

Four scorings at the model's calibrated filter layer and budget ``--budget``, plus full
attention: ``inner`` (raw inner products of the last 32 prompt queries, summed over heads),
``attention`` (per-head softmax over the same window), ``fused`` (the default: both, merged
by best rank) and ``paper`` (the last query's inner product only, ``window=1``).

Families, so that no single haystack decides the default:

- ``synthetic``: :mod:`contract.needles` (the filler and needle templates the layer was
  calibrated on, fresh seeds).
- ``prose``: real text (the stdlib documentation of a dozen modules as ``pydoc`` renders it,
  plus the license texts in /usr/share/common-licenses where present) cut into paragraphs of
  at most 600 characters, with needle templates that appear nowhere else in the project.

Per prompt: the fraction of the answer's tokens each scoring keeps (one filter pass each), and
whether the greedy answer of ``none`` / ``gemfilter`` with each scoring contains the answer.
Writes bench/results/gemfilter_scoring_<model>.json and a section of docs/benchmarks.md.

    python -m bench.gemfilter_scoring
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import pydoc
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import RESULTS_DIR, machine_description, model_slug, needle_prompt, replace_doc_section, write_json

if TYPE_CHECKING:
    from server.engine.hf import HFEngine

logger = logging.getLogger(__name__)

DOC_HEADING = "## GemFilter scoring: the default query window vs the paper's last query"
# label -> GemFilter knobs
SCORINGS: dict[str, dict[str, Any]] = {
    "fused": {"scoring": "fused", "window": 32},
    "inner": {"scoring": "inner_product", "window": 32},
    "attention": {"scoring": "attention", "window": 32},
    "paper": {"scoring": "inner_product", "window": 1},
}
PYDOC_MODULES = (
    "json",
    "argparse",
    "collections",
    "itertools",
    "random",
    "statistics",
    "pathlib",
    "subprocess",
    "asyncio.tasks",
    "email.message",
    "http.client",
    "logging",
)
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic", "GFDL-1.3")
# (sentence with {a}, question, answers): none of these appear in contract.needles.
PROSE_NEEDLES = (
    (
        "Ingrid always hides the spare key to the boathouse under the {a} flowerpot.",
        "Under which flowerpot does Ingrid hide the spare key to the boathouse?",
        ("blue", "green", "cracked", "terracotta", "yellow"),
    ),
    (
        "The quarterly budget meeting was moved to {a} because the CFO was travelling.",
        "To which day was the quarterly budget meeting moved?",
        ("Thursday", "Wednesday", "Friday", "Tuesday"),
    ),
    (
        "According to the lab notebook, the sample was stored at {a} degrees.",
        "At how many degrees was the sample stored, according to the lab notebook?",
        ("-73", "412", "58", "-19"),
    ),
    (
        "Professor Okafor's favourite dessert is {a}.",
        "What is Professor Okafor's favourite dessert?",
        ("tiramisu", "baklava", "pavlova", "cheesecake"),
    ),
    (
        "The access code for the server room in building C is {a}.",
        "What is the access code for the server room in building C?",
        ("7G4-KX9", "Q81-ZZ2", "M40-TR7"),
    ),
)


@dataclass
class Prompt:
    family: str
    depth: float
    prompt_ids: list[int]
    answer_positions: list[int]
    found_in: Callable[[str], bool]


def prose_paragraphs() -> tuple[list[str], list[str]]:
    """Paragraphs of at most 600 characters, and the sources they came from."""
    texts, sources = [], []
    for name in LICENSES:
        path = Path("/usr/share/common-licenses", name)
        if path.exists():
            texts.append(path.read_text(errors="ignore"))
            sources.append(str(path))
    for module in PYDOC_MODULES:
        texts.append(pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext))
        sources.append(f"pydoc {module}")
    paragraphs = []
    for text in texts:
        for block in text.split("\n\n"):
            block = " ".join(block.split())
            while len(block) > 80:
                cut = block.rfind(". ", 0, 600)
                cut = cut + 1 if cut > 80 else min(len(block), 600)
                paragraphs.append(block[:cut])
                block = block[cut:].strip()
    return paragraphs, sources


def prose_prompt(engine: HFEngine, paragraphs: list[str], target: int, depth: float, seed: int) -> Prompt:
    """A chat prompt of about ``target`` tokens: shuffled paragraphs, one needle at ``depth``."""
    rng = random.Random(seed)
    template, question, answers = PROSE_NEEDLES[seed % len(PROSE_NEEDLES)]
    answer = rng.choice(answers)
    needle = template.format(a=answer)
    order = paragraphs[:]
    rng.shuffle(order)

    def message(count: int) -> str:
        body = order[:count]
        at = round(depth * len(body))
        document = "\n\n".join([*body[:at], needle, *body[at:]])
        return f"Here is a long text.\n\n{document}\n\nBased on the text above: {question}"

    low, high = 1, 8
    while len(engine.encode_prompt(message(high))) < target:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if len(engine.encode_prompt(message(mid))) <= target else (low, mid)
    messages = [{"role": "user", "content": message(low)}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    encoded = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text.index(answer, text.index(needle))
    end = start + len(answer)
    positions = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start and b > a]
    return Prompt("prose", depth, list(encoded["input_ids"]), positions, lambda out: answer.lower() in out.lower())


def synthetic_prompt(engine: HFEngine, target: int, depth: float, seed: int) -> Prompt:
    prompt = needle_prompt(engine, target, depth=depth, seed=seed)
    return Prompt("synthetic", depth, prompt.prompt_ids, prompt.answer_token_positions, prompt.case.needle.found_in)


def scores_at_filter_layer(model: Any, prompt_ids: list[int], layer: int) -> dict[str, Any]:
    """Every scoring's token scores from ONE filter pass (the probe sees layer ``layer``'s query
    and key once and scores them each way), so the recall columns cost one pass per prompt."""
    import torch

    from compressors.gemfilter import token_scores
    from compressors.probe import StopForward, attention_probe, install_probe_attention, uses_probe_attention

    if not uses_probe_attention(model):
        install_probe_attention(model)
    found: dict[str, Any] = {}

    def probe(module: Any, query: Any, key: Any, value: Any) -> None:
        if getattr(module, "layer_idx", None) == layer:
            for label, knobs in SCORINGS.items():
                found[label] = token_scores(module, query, key, knobs["scoring"], knobs["window"])
            raise StopForward(None)

    with torch.inference_mode(), attention_probe(probe), contextlib.suppress(StopForward):
        model.base_model(input_ids=torch.tensor([prompt_ids]), use_cache=False)
    return found


def evaluate(engine: HFEngine, prompt: Prompt, budget: int, max_tokens: int, answers: bool) -> dict[str, Any]:
    from compressors.gemfilter import GemFilter, pick_indices
    from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams

    row: dict[str, Any] = {
        "family": prompt.family,
        "depth": round(prompt.depth, 3),
        "prompt_tokens": len(prompt.prompt_ids),
        "answer_tokens": len(prompt.answer_positions),
    }
    method = GemFilter(budget=budget)
    scores = scores_at_filter_layer(engine.model, prompt.prompt_ids, method.filter_layer(engine.model))
    for label, score in scores.items():
        kept = set(pick_indices(score, budget, method.kernel_size, method.tail, fuse=method.fuse))
        row[f"recall_{label}"] = sum(p in kept for p in prompt.answer_positions) / len(prompt.answer_positions)
    runs = [("none", "none", {})] + [
        (label, "gemfilter", {"budget": budget, **knobs}) for label, knobs in SCORINGS.items()
    ]
    if not answers:
        runs = []
    for label, method, knobs in runs:
        request = GenerationRequest(
            prompt_ids=prompt.prompt_ids,
            sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
            compression=CompressionSpec(method=method, knobs=knobs),
        )
        text = engine.generate(request).text
        row[f"found_{label}"] = prompt.found_in(text)
        row[f"text_{label}"] = text
    logger.info("%s", {k: v for k, v in row.items() if not k.startswith("text_")})
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["family"], row["target_tokens"]), []).append(row)
    summary = []
    for (family, target), group in groups.items():
        entry: dict[str, Any] = {"family": family, "target_tokens": target, "prompts": len(group)}
        for scoring in SCORINGS:
            entry[f"recall_{scoring}"] = round(sum(r[f"recall_{scoring}"] for r in group) / len(group), 3)
        for label in ("none", *SCORINGS):
            if all(f"found_{label}" in r for r in group):
                entry[f"found_{label}"] = sum(r[f"found_{label}"] for r in group)
        summary.append(entry)
    return summary


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from compressors.gemfilter import GemFilter
    from server.engine.hf import HFEngine
    from server.models import load_model

    torch.set_num_threads(args.threads)
    engine = HFEngine(load_model(args.model, device="cpu"))
    paragraphs, sources = prose_paragraphs()
    rows = []
    for family, target in [("prose", t) for t in args.prose_tokens] + [("synthetic", t) for t in args.synthetic_tokens]:
        for i in range(args.cases):
            depth = (i + 0.5) / args.cases
            if family == "prose":
                prompt = prose_prompt(engine, paragraphs, target, depth, seed=3000 + i + target)
            else:
                prompt = synthetic_prompt(engine, target, depth, seed=args.synthetic_seed + i)
            row = evaluate(engine, prompt, args.budget, args.max_tokens, answers=not args.recall_only)
            rows.append({"target_tokens": target, **row})
    return {
        "model": engine.model_name,
        "filter_layer": GemFilter().filter_layer(engine.model),
        "window": GemFilter().window,
        "budget": args.budget,
        "max_tokens": args.max_tokens,
        "prose_sources": sources,
        "machine": machine_description(),
        "summary": summarize(rows),
        "rows": rows,
    }


def doc_section(data: dict[str, Any]) -> str:
    labels = list(SCORINGS)
    answered = all("found_none" in r for r in data["rows"])
    lines = [
        DOC_HEADING,
        "",
        f"`python -m bench.gemfilter_scoring` ({data['model']}, filter layer {data['filter_layer']}, "
        f"k={data['budget']}, greedy, {data['max_tokens']} new tokens; {data['machine']['dtype']} on CPU). "
        "Recall = mean fraction of "
        "the answer's tokens the selection keeps; answers = greedy outputs containing the answer. `inner` = raw "
        "inner products of the last 32 prompt queries summed over heads; `attention` = per-head softmax over the "
        "same window; `fused` = both merged by best rank (the default); `paper` = the last query's inner product "
        "only (Algorithm 1). `prose` = "
        "stdlib docs and license texts with needle templates used nowhere else; `synthetic` = contract.needles "
        "(the calibration family, fresh seeds).",
        "",
        "| family | ~tokens | prompts | "
        + " | ".join(f"recall {label}" for label in labels)
        + (" | answers none | " + " | ".join(f"answers {label}" for label in labels) if answered else "")
        + " |",
        "|---|---:|---:|" + "---:|" * (len(labels) + (len(labels) + 1 if answered else 0)),
    ]
    for s in data["summary"]:
        n = s["prompts"]
        cells = [f"{s[f'recall_{label}']:.2f}" for label in labels]
        if answered:
            cells += [f"{s[f'found_{label}']}/{n}" for label in ("none", *labels)]
        lines.append(f"| {s['family']} | {s['target_tokens']} | {n} | {' | '.join(cells)} |")
    rows = data["rows"]
    if answered:
        totals = ", ".join(f"{label} {sum(r[f'found_{label}'] for r in rows)}" for label in ("none", *labels))
        lines += [
            "",
            f"All {len(rows)} prompts answered: {totals}. SmolLM2-135M misses many of these even with full "
            "attention, so the answer counts are small; the recall columns say what the selection itself keeps.",
        ]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--cases", type=int, default=6, help="prompts per family and length (spread depths)")
    parser.add_argument("--prose-tokens", type=int, nargs="*", default=[4096, 7000])
    parser.add_argument("--synthetic-tokens", type=int, nargs="*", default=[4096])
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recall-only", action="store_true", help="skip the greedy answers (one filter pass each)")
    parser.add_argument("--synthetic-seed", type=int, default=4000, help="first synthetic case's seed")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data = run(args)
    write_json(args.output or RESULTS_DIR / f"gemfilter_scoring_{model_slug(data['model'])}.json", data)
    if not args.no_doc:
        replace_doc_section(DOC_HEADING, doc_section(data))
    print(doc_section(data))


if __name__ == "__main__":
    main()
