"""``gemserve eval``: RULER-style long-context tasks x lengths x depths x methods, scored.

    gemserve eval --tasks niah_single,niah_multikey --lengths 1024,4096 \\
        --methods none,gemfilter:1024,snapkv:1024 --output-dir DIR
    gemserve eval --methods none,gemfilter,snapkv --budgets 256,1024,4096 ...   # budget curves
    gemserve eval --base-url http://host:8000 ...                             # any OpenAI server

Every sample is generated here from a seed (:mod:`evals.tasks`, no downloads) and fitted to the
target length with the target's own tokenizer. Rows go to ``records.jsonl`` as they finish, so
``--resume`` picks a cut-short run up where it stopped; at the end (and on resume) the JSON, CSV,
heatmap, budget-curve PNGs and a markdown summary are written (:mod:`evals.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from contract.methods import GRAMMAR, MethodSpec, parse_methods
from evals.haystacks import HAYSTACKS
from evals.scoring import answers_kept_whole, score
from evals.targets import STYLES, HTTPTarget, InProcessTarget, Outcome, Target
from evals.tasks import TASKS, TASKS_WITHOUT_DEPTH, Sample, build_sample, sample_seed
from server.settings import add_dtype_arguments

RECORDS_FILE = "records.jsonl"
META_FILE = "meta.json"


def csv_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in csv_list(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def depth_list(text: str) -> list[float]:
    """``5`` -> five depths evenly spread over [0, 1]; ``0,0.5,1`` -> those depths."""
    parts = csv_list(text)
    if len(parts) == 1 and parts[0].isdigit():
        count = int(parts[0])
        if count < 1:
            raise argparse.ArgumentTypeError("--depths needs at least one depth")
        return [0.5] if count == 1 else [round(i / (count - 1), 4) for i in range(count)]
    try:
        depths = [float(part) for part in parts]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--depths takes a count or depths in [0, 1], got '{text}'") from exc
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be in [0, 1], got '{text}'")
    return depths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=csv_list, default=["niah_single"], help=f"comma list of {', '.join(TASKS)}")
    parser.add_argument(
        "--haystacks", type=csv_list, default=["prose"], help=f"comma list of {', '.join(HAYSTACKS)} (default prose)"
    )
    parser.add_argument("--lengths", type=int_list, default=[1024, 4096], help="prompt lengths in tokens")
    parser.add_argument("--depths", type=depth_list, default=depth_list("5"), help="a count (5) or a list (0,0.5,1)")
    parser.add_argument("--samples", type=int, default=1, help="samples per (task, haystack, length, depth) cell")
    parser.add_argument("--methods", type=csv_list, default=["none", "gemfilter:1024"], help=GRAMMAR)
    parser.add_argument("--budgets", type=int_list, default=[], help="budgets for methods named without one")
    parser.add_argument(
        "--style", choices=(*STYLES, "auto"), default="auto", help="auto: chat if the model has a template"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (each cell derives its own)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where records and reports go")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --output-dir, run the rest")
    parser.add_argument("--base-url", help="an OpenAI-compatible server instead of a model in this process")
    parser.add_argument("--api-key", default=os.environ.get("GEMSERVE_API_KEY"), help="bearer key for --base-url")
    parser.add_argument(
        "--model", help="in-process: alias, .gguf or HF dir (default smollm2-135m-instruct); --base-url: served name"
    )
    parser.add_argument("--device", default="auto")
    add_dtype_arguments(parser)
    parser.add_argument("--cache-dir", type=Path, help="where converted models live (env GEMSERVE_CACHE_DIR)")
    parser.add_argument("--max-model-len", type=int, help="cap the context length (default: the model's)")
    parser.add_argument(
        "--profile", type=Path, help="a GemFilter profile (gemserve calibrate) for the in-process model"
    )
    parser.add_argument(
        "--no-share", action="store_true", help="in-process: run each method alone (no shared filter pass / prefill)"
    )


def check_arguments(args: argparse.Namespace) -> list[MethodSpec]:
    """Refuse a bad grid before any model loads."""
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
    unknown = [h for h in args.haystacks if h not in HAYSTACKS]
    if unknown:
        raise ValueError(f"unknown haystack {', '.join(unknown)}; haystacks: {', '.join(HAYSTACKS)}")
    if args.samples < 1:
        raise ValueError("--samples must be >= 1")
    if args.output_dir.exists() and any(args.output_dir.iterdir()) and not args.resume:
        raise ValueError(f"{args.output_dir} is not empty: pass --resume to continue that run, or another directory")
    return parse_methods(args.methods, args.budgets)


def grid(args: argparse.Namespace) -> list[tuple[str, str, int, float | None, int]]:
    """(task, haystack, length, depth, seed) per sample; tasks without a depth once per cell."""
    cells = []
    for task in args.tasks:
        haystacks = args.haystacks[:1] if task in TASKS_WITHOUT_DEPTH else args.haystacks
        depths: list[float | None] = [None] if task in TASKS_WITHOUT_DEPTH else list(args.depths)
        for haystack in haystacks:
            for length in args.lengths:
                for depth in depths:
                    for repeat in range(args.samples):
                        seed = sample_seed(args.seed, task, haystack, length, depth, repeat)
                        cells.append((task, haystack, length, depth, seed))
    return cells


def make_target(args: argparse.Namespace, methods: list[MethodSpec]) -> Target:
    if args.base_url:
        return HTTPTarget(args.base_url, api_key=args.api_key, model=args.model)
    from server.engine.hf import HFEngine
    from server.models import load_model

    loaded = load_model(
        args.model or "smollm2-135m-instruct",
        device=args.device,
        cache_dir=args.cache_dir,
        max_model_len=args.max_model_len,
        profile=args.profile,
        dtype=args.dtype,
        filter_dtype=args.filter_dtype,
    )
    return InProcessTarget(HFEngine(loaded), share=not args.no_share)


def check_methods_in_process(methods: list[MethodSpec]) -> None:
    """Bad names and knobs fail before the model loads (a server checks its own)."""
    from compressors import CompressionError, build_method

    for spec in methods:
        if spec.method_name() is None:  # default: the engine's own
            continue
        try:
            build_method(spec.name, spec.method_knobs())
        except CompressionError as exc:
            raise ValueError(f"method '{spec.label}': {exc}") from exc


def resolve_style(args: argparse.Namespace, target: Target) -> str:
    if args.style != "auto":
        return args.style
    engine = getattr(target, "engine", None)
    if engine is not None and engine.tokenizer.chat_template is None:
        return "completion"  # a base model: the prompt ends with the start of the answer
    return "chat"


def record_for(sample: Sample, style: str, spec: MethodSpec, outcome: Outcome | None, error: str | None) -> dict:
    row: dict[str, Any] = {
        "task": sample.task,
        "haystack": sample.haystack,
        "style": style,
        "target_tokens": sample.target_tokens,
        "prompt_tokens": outcome.prompt_tokens if outcome else None,
        "depth": sample.depth,
        "seed": sample.seed,
        "uid": sample.uid,
        "method": spec.label,
        "method_name": spec.name,
        "budget": spec.budget,
        "variant": spec.variant,
        "answers": list(sample.answers),
        "error": error,
    }
    if outcome is None:
        return {**row, "score": 0.0, "output": "", "answer_kept": None, "answer_token_recall": None}
    return {
        **row,
        "score": score(sample, outcome.text),
        "answer_kept": answers_kept_whole(sample, outcome.span_texts) if outcome.span_texts is not None else None,
        "answer_token_recall": outcome.answer_token_recall,
        "output": outcome.text,
        "kept_tokens": outcome.kept_tokens,
        "layer": outcome.layer,
        "ttft_ms": outcome.ttft_ms,
        "shared_prefill": outcome.shared_prefill,
        "compression": outcome.compression,
    }


def load_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that row runs again
    return records


def run(args: argparse.Namespace) -> int:
    methods = check_arguments(args)
    cells = grid(args)
    if not args.base_url:
        check_methods_in_process(methods)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    records_path = out / RECORDS_FILE
    records = load_records(records_path) if args.resume else []
    done = {(r["uid"], r["style"], r["method"]) for r in records if r.get("error") is None}
    records = [r for r in records if (r["uid"], r["style"], r["method"]) in done]  # failed rows run again
    target = make_target(args, methods)
    style = resolve_style(args, target)
    meta = {
        "model": target.model_name,
        "dtype": target.dtype,
        "target": args.base_url or "in-process",
        "style": style,
        "tasks": args.tasks,
        "haystacks": args.haystacks,
        "lengths": args.lengths,
        "depths": args.depths,
        "samples": args.samples,
        "seed": args.seed,
        "methods": [spec.label for spec in methods],
        "shared_prefill": not args.base_url and not args.no_share,
        "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }
    started = time.perf_counter()
    with records_path.open("w", encoding="utf-8") as sink, tqdm(total=len(cells) * len(methods), unit="row") as bar:
        for row in records:
            sink.write(json.dumps(row) + "\n")
        bar.update(len(records))
        for task, haystack, length, depth, seed in cells:
            new = run_cell(target, style, methods, done, task, haystack, length, depth, seed)
            for row in new:
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            records += new
            bar.update(len(new))
            bar.set_postfix_str(f"{task} {length} d={depth}")
    meta["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    meta["elapsed_s"] = round(time.perf_counter() - started, 1)
    meta["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    from evals.report import markdown_summary, write_reports

    written = write_reports(records, meta, out)
    print(markdown_summary(records, meta))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def run_cell(
    target: Target,
    style: str,
    methods: list[MethodSpec],
    done: set[tuple[str, str, str]],
    task: str,
    haystack: str,
    length: int,
    depth: float | None,
    seed: int,
) -> list[dict[str, Any]]:
    """One sample, every method not yet done; a failed generation is a row with its error."""
    sample = build_sample(task, haystack, length, depth, seed, lambda s: target.count_tokens(s, style))
    todo = [spec for spec in methods if (sample.uid, style, spec.label) not in done]
    if not todo:
        return []
    try:
        outcomes = target.run(sample, style, todo)
    except (RuntimeError, OSError) as exc:
        if "HTTP 4" in str(exc):
            raise ValueError(str(exc)) from exc  # the request itself is wrong: every row would fail the same way
        return [record_for(sample, style, spec, None, str(exc)[:500]) for spec in todo]
    return [record_for(sample, style, spec, outcome, None) for spec, outcome in zip(todo, outcomes, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
