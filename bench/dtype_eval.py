"""``none`` in bfloat16 against float32 on the same ``gemserve eval`` prompts (issue 23).

Runs the eval suite once per dtype into ``bench/results/dtype_eval/<model>_<dtype>`` (skipped when
that directory already holds a finished run; ``--resume`` semantics of the eval), then pairs the
rows by their uid (same task, haystack, length, depth and seed, so the same prompt) and reports:
mean score per dtype, per task and length, how many rows got the same score, and where they
differ. Quality only: on a CPU without native bfloat16 the bfloat16 run is emulated and its time
means nothing, so no time is reported.

    python -m bench.dtype_eval --model smollm2-135m-instruct --lengths 512,1024

Writes bench/results/dtype_eval_<model>.json, a PNG beside it, and a docs/benchmarks.md section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Any

from bench.common import (
    RESULTS_DIR,
    figure,
    grouped_bars,
    machine_description,
    model_slug,
    replace_doc_section,
    write_json,
)

DTYPES = ("float32", "bfloat16")
TASKS = "niah_single,niah_multikey,niah_multivalue,vt"
HAYSTACKS = "noise,prose,records"
DOC_HEADING = "## `none` in bfloat16 against float32 on gemserve eval (issue 23)"


def run_eval(model: str, dtype: str, lengths: str, out_dir: Path) -> None:
    if (out_dir / "summary.md").exists():
        return
    command = [
        *(sys.executable, "-m", "cli", "eval"),
        *("--model", model, "--dtype", dtype, "--filter-dtype", dtype, "--methods", "none"),
        *("--tasks", TASKS, "--haystacks", HAYSTACKS, "--lengths", lengths, "--depths", "5"),
        *("--output-dir", str(out_dir), "--resume"),
    ]
    subprocess.run(command, check=True)


def rows_of(out_dir: Path) -> dict[str, dict[str, Any]]:
    with (out_dir / "records.jsonl").open(encoding="utf-8") as records:
        return {row["uid"]: row for row in map(json.loads, records) if row.get("error") is None}


def compare(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    shared = sorted(set.intersection(*(set(rows) for rows in runs.values())))
    first = runs[DTYPES[0]]
    cells: dict[str, dict[str, list[float]]] = {}
    for uid in shared:
        row = first[uid]
        for key in (f"{row['task']}", f"{row['target_tokens']} tokens", "all"):
            for dtype in DTYPES:
                cells.setdefault(key, {}).setdefault(dtype, []).append(runs[dtype][uid]["score"])
    # Tasks, then lengths (shortest first), then all rows.
    order = sorted(
        cells, key=lambda key: (key == "all", key[0].isdigit(), int(key.split()[0]) if key[0].isdigit() else 0, key)
    )
    cells = {key: cells[key] for key in order}
    differ = [
        {"uid": uid, **{dtype: runs[dtype][uid]["score"] for dtype in DTYPES}}
        for uid in shared
        if len({runs[dtype][uid]["score"] for dtype in DTYPES}) > 1
    ]
    return {
        "paired_rows": len(shared),
        "same_score": len(shared) - len(differ),
        "mean_score": {key: {dtype: round(mean(s), 4) for dtype, s in by.items()} for key, by in cells.items()},
        "rows_per_cell": {key: len(by[DTYPES[0]]) for key, by in cells.items()},
        "differ": differ,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    keys = [key for key in result["comparison"]["mean_score"] if key != "all"] + ["all"]
    scores = result["comparison"]["mean_score"]
    with figure(path, figsize=(8, 4)) as (_fig, ax):
        grouped_bars(ax, keys, list(DTYPES), lambda key, dtype: scores[key][dtype])
        ax.set_xlabel("")
        ax.set_ylabel("mean score")
        ax.set_title(f"{result['model']}: method none, float32 vs bfloat16 ({result['machine']['cpu']})", fontsize=9)


def markdown_section(result: dict[str, Any], out_path: Path) -> str:
    c, m = result["comparison"], result["machine"]
    lines = [
        f"{DOC_HEADING} — {model_slug(result['model'])}",
        "",
        f"`python -m bench.dtype_eval --model {result['model']} --lengths {result['lengths']}` on {m['cpu']} "
        f"({m['cpu_cores']} cores; CPU flags {', '.join(m['cpu_flags']) or '-'}): `gemserve eval`, method `none`, "
        f"tasks {TASKS.replace(',', ', ')} on haystacks {HAYSTACKS.replace(',', ', ')}, 5 depths, the same prompts "
        f"(paired by uid) in each dtype. Quality only (this CPU emulates bfloat16). {c['paired_rows']} paired "
        f"rows, {c['same_score']} with the same score. Data `bench/results/{out_path.name}`, plot "
        f"`bench/results/{out_path.with_suffix('.png').name}`, rows `bench/results/dtype_eval/`.",
        "",
        "| cell | rows | float32 | bfloat16 |",
        "|---|---:|---:|---:|",
    ]
    for key, scores in c["mean_score"].items():
        lines.append(f"| {key} | {c['rows_per_cell'][key]} | {scores['float32']:.3f} | {scores['bfloat16']:.3f} |")
    if c["differ"]:
        lines += ["", "Rows whose score differs (uid: float32 / bfloat16):", ""]
        lines += [f"- `{d['uid']}`: {d['float32']:.2f} / {d['bfloat16']:.2f}" for d in c["differ"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", default="512,1024")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    slug = model_slug(args.model)
    dirs = {dtype: RESULTS_DIR / "dtype_eval" / f"{slug}_{dtype}" for dtype in DTYPES}
    for dtype, out_dir in dirs.items():
        run_eval(args.model, dtype, args.lengths, out_dir)
    result = {
        "benchmark": "dtype_eval",
        "model": args.model,
        "lengths": args.lengths,
        "machine": machine_description("float32"),
        "runs": {dtype: str(out_dir.relative_to(RESULTS_DIR)) for dtype, out_dir in dirs.items()},
        "comparison": compare({dtype: rows_of(out_dir) for dtype, out_dir in dirs.items()}),
    }
    out_path = RESULTS_DIR / f"dtype_eval_{slug}.json"
    write_json(out_path, result)
    plot(result, out_path.with_suffix(".png"))
    section = markdown_section(result, out_path)
    if not args.no_doc:
        replace_doc_section(f"{DOC_HEADING} — {slug}", section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
