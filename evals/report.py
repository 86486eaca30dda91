"""Outputs of `gemserve eval`: results.json, results.csv, heatmap.png, budget_curves.png and summary.md.

The runner hands over one plain dict per (sample, method) with the keys in ``COLUMNS``. Rows whose
``error`` is set are left out of every mean and counted instead, so one failed request shows up as a
failure rather than as a score of 0. Groups keep a fixed order: methods and tasks as first seen,
lengths and budgets ascending, so two runs over the same grid give the same files.

matplotlib is imported inside the plotting functions: importing this module (the CLI does) stays fast.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

Record = dict[str, Any]

# CSV column order, the runner's record keys.
COLUMNS: tuple[str, ...] = (
    "task",
    "haystack",
    "style",
    "target_tokens",
    "prompt_tokens",
    "depth",
    "seed",
    "uid",
    "method",
    "method_name",
    "budget",
    "variant",
    "score",
    "answer_kept",
    "answer_token_recall",
    "output",
    "answers",
    "kept_tokens",
    "layer",
    "ttft_ms",
    "error",
)
LIST_SEPARATOR = " | "
NA = "n/a"
# Largest figure, in inches: past this, panels shrink instead of the PNG growing without bound.
MAX_FIG_W, MAX_FIG_H = 26.0, 20.0
DPI = 110


# ---- grouping helpers ---------------------------------------------------------------------------------------------


def _ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.get("error") is None]


def _first_seen(records: Iterable[Record], key: str) -> list[Any]:
    seen: dict[Any, None] = {}
    for r in records:
        seen.setdefault(r.get(key), None)
    return list(seen)


def _lengths(records: Iterable[Record]) -> list[int]:
    return sorted({int(r["target_tokens"]) for r in records if r.get("target_tokens") is not None})


def _depth_key(depth: float | None) -> float | None:
    # Rounded so 0.1 + 0.2 and 0.3 land in one column.
    return None if depth is None else round(float(depth), 4)


def _depth_columns(records: Iterable[Record]) -> list[float | None]:
    keys = {_depth_key(r.get("depth")) for r in records}
    numeric = sorted(k for k in keys if k is not None)
    return [*numeric, None] if None in keys else numeric


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _group(records: Sequence[Record], **match: Any) -> tuple[list[Record], int]:
    """Successful rows matching every key=value, and the number of failed ones."""
    rows = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    ok = _ok(rows)
    return ok, len(rows) - len(ok)


def _score_cell(ok: list[Record], errors: int) -> dict[str, Any]:
    return {"n": len(ok), "errors": errors, "mean_score": _mean(r.get("score") for r in ok)}


# ---- summary ------------------------------------------------------------------------------------------------------


def summary(records: Sequence[Record]) -> dict[str, Any]:
    """Mean scores per method, per (method, target_tokens) and per (task, method).

    ``n`` counts the rows that went into a mean, ``errors`` the failed rows of the same group.
    ``answer_kept`` / ``answer_token_recall`` are means over the rows that measured them (``n_measured``);
    None where no row did. ``mean_score`` is None for a group with no successful row.
    """
    methods = _first_seen(records, "method")
    tasks = _first_seen(records, "task")
    lengths = _lengths(records)
    per_method = []
    for method in methods:
        ok, errors = _group(records, method=method)
        first = next(r for r in records if r.get("method") == method)
        kept = [r["answer_kept"] for r in ok if r.get("answer_kept") is not None]
        recall = [r["answer_token_recall"] for r in ok if r.get("answer_token_recall") is not None]
        per_method.append(
            {
                "method": method,
                "method_name": first.get("method_name"),
                "variant": first.get("variant"),
                "budget": first.get("budget"),
                **_score_cell(ok, errors),
                "answer_kept": _mean(kept),
                "answer_kept_n_measured": len(kept),
                "answer_token_recall": _mean(recall),
                "answer_token_recall_n_measured": len(recall),
                "mean_ttft_ms": _mean(r.get("ttft_ms") for r in ok),
            }
        )
    by_length = []
    for method in methods:
        for length in lengths:
            ok, errors = _group(records, method=method, target_tokens=length)
            if ok or errors:
                by_length.append({"method": method, "target_tokens": length, **_score_cell(ok, errors)})
    by_task = []
    for task in tasks:
        for method in methods:
            ok, errors = _group(records, task=task, method=method)
            if ok or errors:
                by_task.append({"task": task, "method": method, **_score_cell(ok, errors)})
    n_ok = len(_ok(records))
    return {
        "n": n_ok,
        "errors": len(records) - n_ok,
        "methods": methods,
        "tasks": tasks,
        "lengths": lengths,
        "per_method": per_method,
        "by_length": by_length,
        "by_task": by_task,
    }


# ---- CSV / JSON ---------------------------------------------------------------------------------------------------


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return LIST_SEPARATOR.join(str(v) for v in value)
    return value


def write_csv(records: Sequence[Record], path: str | Path) -> Path:
    """One row per record, columns in ``COLUMNS`` order; None is an empty cell, lists are joined with " | "."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in records:
            writer.writerow([_csv_cell(r.get(c)) for c in COLUMNS])
    return path


def write_json(records: Sequence[Record], meta: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    data = {"meta": meta, "records": list(records), "summary": summary(records)}
    # default=str: a stray Path or numpy scalar in meta must not lose the whole run's results.
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# ---- plots --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(n_rows: int, n_cols: int, panel_w: float, panel_h: float, extra_w: float) -> tuple[float, float, float]:
    """Figure size for a grid of panels, shrunk to the cap; returns (width, height, scale)."""
    width, height = n_cols * panel_w + extra_w, n_rows * panel_h + 0.6
    scale = min(1.0, MAX_FIG_W / width, MAX_FIG_H / height)
    return width * scale, height * scale, scale


def _panels(tasks: list[Any], inner: list[Any], wrap: int) -> tuple[int, int, list[tuple[int, int, Any, Any]]]:
    """Rows = tasks and cols = inner items when there are several tasks; one task wraps inner over rows."""
    if len(tasks) > 1:
        cells = [(i, j, t, x) for i, t in enumerate(tasks) for j, x in enumerate(inner)]
        return len(tasks), len(inner), cells
    n_cols = min(len(inner), wrap)
    n_rows = math.ceil(len(inner) / n_cols)
    return n_rows, n_cols, [(k // n_cols, k % n_cols, tasks[0], x) for k, x in enumerate(inner)]


def _placeholder(path: Path, text: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_heatmaps(records: Sequence[Record], path: str | Path) -> Path:
    """Mean score per (target_tokens, depth), one panel per method (x task when there are several tasks)."""
    path = Path(path)
    methods, tasks = _first_seen(records, "method"), _first_seen(records, "task")
    if not records:
        _placeholder(path, "no results")
        return path
    plt = _pyplot()
    import numpy as np

    lengths = _lengths(records)
    scores: dict[tuple[Any, Any, int, float | None], list[float]] = {}
    for r in _ok(records):
        key = (r.get("task"), r.get("method"), r.get("target_tokens"), _depth_key(r.get("depth")))
        scores.setdefault(key, []).append(r["score"])
    # Depth columns per task: a task without depths (cwe, vt) gets only the "n/a" column.
    depth_cols = {t: _depth_columns(r for r in records if r.get("task") == t) for t in tasks}
    widest = max(len(c) for c in depth_cols.values())
    n_rows, n_cols, cells = _panels(tasks, methods, wrap=4)
    panel_w, panel_h = 0.62 * widest + 1.4, 0.42 * len(lengths) + 1.3
    fig_w, fig_h, scale = _grid(n_rows, n_cols, panel_w, panel_h, extra_w=1.2)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, fig_h), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")  # grey: no sample in that cell
    # Values in the cells only while they still fit: past that the colours carry it.
    annotate = scale * min(panel_w / max(widest, 1), panel_h / max(len(lengths), 1)) >= 0.3
    font = max(5.0, min(9.0, 9.0 * scale))
    image = None
    run = {(r.get("task"), r.get("method")) for r in records}
    for i, j, task, method in cells:
        ax = axes[i][j]
        if (task, method) not in run:
            ax.axis("off")
            ax.text(0.5, 0.5, f"{task} · {method}\nnot run", ha="center", va="center", fontsize=font, color="grey")
            continue
        cols = depth_cols[task]
        grid = np.full((len(lengths), len(cols)), np.nan)
        for y, length in enumerate(lengths):
            for x, depth in enumerate(cols):
                value = _mean(scores.get((task, method, length, depth), []))
                if value is not None:
                    grid[y, x] = value
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, origin="lower", aspect="auto")
        ax.set_xticks(range(len(cols)), [NA if d is None else f"{d:g}" for d in cols], fontsize=font)
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=font)
        ax.set_title(str(method) if len(tasks) == 1 else f"{task} · {method}", fontsize=font + 1)
        if annotate:
            for (y, x), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    colour = "white" if value < 0.2 or value > 0.85 else "black"
                    ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=font, color=colour)
        if j == 0:
            ax.set_ylabel("target tokens", fontsize=font)
        if i == n_rows - 1:
            ax.set_xlabel("depth", fontsize=font)
    for ax in axes.ravel()[len(cells) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="mean score", shrink=0.9)
    fig.suptitle("mean score by length and needle depth (grey: no sample)", fontsize=font + 2)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _has_curves(records: Sequence[Record]) -> bool:
    ok = [r for r in _ok(records) if r.get("budget") is not None]
    budgets: dict[Any, set[int]] = {}
    for r in ok:
        budgets.setdefault(r.get("variant"), set()).add(int(r["budget"]))
    return any(len(b) >= 2 for b in budgets.values())


def plot_budget_curves(records: Sequence[Record], path: str | Path) -> bool:
    """Mean score against budget, one line per variant, one panel per length (x task when several).

    Methods without a budget (``none``) are a dashed horizontal line. Returns False and writes nothing
    when no variant was run at 2 budgets or more: a curve needs two points.
    """
    if not _has_curves(records):
        return False
    path = Path(path)
    plt = _pyplot()
    ok = _ok(records)
    tasks, lengths, variants = _first_seen(ok, "task"), _lengths(ok), _first_seen(ok, "variant")
    budgets = sorted({int(r["budget"]) for r in ok if r.get("budget") is not None})
    colours = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    colour = {v: colours(k % colours.N) for k, v in enumerate(variants)}
    n_rows, n_cols, cells = _panels(tasks, lengths, wrap=3)
    fig_w, fig_h, scale = _grid(n_rows, n_cols, 4.2, 3.2, extra_w=2.4)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, fig_h), squeeze=False, layout="constrained")
    font = max(5.0, min(9.0, 9.0 * scale))
    handles: dict[str, Any] = {}
    for i, j, task, length in cells:
        ax = axes[i][j]
        rows = [r for r in ok if r.get("task") == task and r.get("target_tokens") == length]
        if not rows:
            ax.text(0.5, 0.5, "no successful rows", ha="center", va="center", transform=ax.transAxes, color="grey")
        for variant in variants:
            mine = [r for r in rows if r.get("variant") == variant]
            if not mine:
                continue
            with_budget = sorted({int(r["budget"]) for r in mine if r.get("budget") is not None})
            if with_budget:
                ys = [_mean(r["score"] for r in mine if r.get("budget") == b) for b in with_budget]
                (line,) = ax.plot(with_budget, ys, marker="o", color=colour[variant], label=str(variant))
            else:
                line = ax.axhline(_mean(r["score"] for r in mine), ls="--", color=colour[variant], label=str(variant))
            handles.setdefault(str(variant), line)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets], fontsize=font)
        ax.minorticks_off()
        ax.set_xlim(budgets[0] / 1.3, budgets[-1] * 1.3)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(axis="y", labelsize=font)
        ax.grid(alpha=0.3)
        ax.set_title(f"{length} tokens" if len(tasks) == 1 else f"{task} · {length} tokens", fontsize=font + 1)
        if j == 0:
            ax.set_ylabel("mean score", fontsize=font)
        if i == n_rows - 1:
            ax.set_xlabel("budget (tokens kept)", fontsize=font)
    for ax in axes.ravel()[len(cells) :]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=font)
    fig.suptitle("mean score against budget (dashed: no budget)", fontsize=font + 2)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


# ---- markdown -----------------------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        # A "|" in a method label would split the cell.
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [
        line(header),
        "|" + "|".join("---" if k == 0 else "---:" for k in range(len(header))) + "|",
        *(line(row) for row in rows),
    ]


def _meta_value(value: Any) -> str | None:
    """Meta values shown in the header; nested structures stay in results.json."""
    if isinstance(value, list | tuple):
        if all(isinstance(v, str | int | float | bool) or v is None for v in value):
            return ", ".join(str(v) for v in value)
        return None
    if isinstance(value, dict):
        return None
    return str(value)


def _elapsed(value: Any) -> str:
    if isinstance(value, int | float):
        return f"{value:.0f} s" if value < 120 else f"{value:.0f} s ({value / 60:.1f} min)"
    return str(value)


def _loadavg(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " / ".join(f"{v:.2f}" if isinstance(v, int | float) else str(v) for v in value)
    return str(value)


# (label, meta keys tried in order, formatter) for the header; other scalar meta keys follow as they come.
_META_FIELDS: tuple[tuple[str, tuple[str, ...], Callable[[Any], str | None]], ...] = (
    ("model", ("model",), _meta_value),
    ("style", ("style", "styles"), _meta_value),
    ("tasks", ("tasks",), _meta_value),
    ("haystacks", ("haystacks", "haystack"), _meta_value),
    ("lengths", ("lengths", "target_tokens"), _meta_value),
    ("depths", ("depths",), _meta_value),
    ("methods", ("methods",), _meta_value),
    ("seed", ("seed", "seeds"), _meta_value),
    ("started", ("started", "started_at"), _meta_value),
    ("finished", ("finished", "finished_at"), _meta_value),
    ("elapsed", ("elapsed_s", "elapsed"), _elapsed),
    ("load average (1/5/15 min)", ("loadavg", "load_average", "loadavg_1_5_15"), _loadavg),
)


def _header(meta: dict[str, Any]) -> list[str]:
    lines, used = [], set()
    for label, keys, fmt in _META_FIELDS:
        for key in keys:
            if key in meta and meta[key] is not None:
                used.add(key)
                text = fmt(meta[key])
                if text is not None:
                    lines.append(f"- **{label}**: {text}")
                break
        used.update(keys)
    for key, value in meta.items():
        text = None if key in used or value is None else _meta_value(value)
        if text is not None:
            lines.append(f"- **{key}**: {text}")
    return lines


def budget_tables(records: Sequence[Record]) -> list[str]:
    """Per length: one row per variant, one column per budget (the budget curves as numbers);
    methods without a budget (``none``) in the last column."""
    ok = _ok(records)
    budgets = sorted({r["budget"] for r in ok if r.get("budget") is not None})
    variants = _first_seen(ok, "variant")
    lines = ["## Mean score by budget", "", "Cells: mean score (n); `unbudgeted`: methods without a budget.", ""]
    for length in _lengths(ok):
        rows = []
        for variant in variants:
            cells = []
            for budget in [*budgets, None]:
                scores = [
                    r["score"]
                    for r in ok
                    if r["variant"] == variant and r["target_tokens"] == length and r.get("budget") == budget
                ]
                cells.append(f"{_fmt(_mean(scores))} ({len(scores)})" if scores else "")
            rows.append([str(variant), *cells])
        lines += [f"{length} tokens:", "", *_table(["variant", *map(str, budgets), "unbudgeted"], rows), ""]
    return lines


def markdown_summary(records: Sequence[Record], meta: dict[str, Any]) -> str:
    """The run as markdown: meta header, method x length, task x method, answer kept, failed rows."""
    s = summary(records)
    lines = ["# gemserve eval", "", *_header(meta), ""]

    lines += ["## Mean score by method and length", "", "Cells: mean score (n successful rows).", ""]
    by_length = {(c["method"], c["target_tokens"]): c for c in s["by_length"]}
    rows = []
    for m in s["per_method"]:
        cells = [by_length.get((m["method"], n)) for n in s["lengths"]]
        rows.append(
            [
                str(m["method"]),
                *("" if c is None else f"{_fmt(c['mean_score'])} ({c['n']})" for c in cells),
                f"{_fmt(m['mean_score'])} ({m['n']})",
            ]
        )
    lines += [*_table(["method", *(str(n) for n in s["lengths"]), "all"], rows), ""]

    lines += ["## Mean score by task and method", ""]
    by_task = {(c["task"], c["method"]): c for c in s["by_task"]}
    rows = [
        [str(t), *("" if (c := by_task.get((t, m))) is None else _fmt(c["mean_score"]) for m in s["methods"])]
        for t in s["tasks"]
    ]
    lines += [*_table(["task", *(str(m) for m in s["methods"])], rows), ""]

    if _has_curves(records):
        lines += budget_tables(records)

    measured = [m for m in s["per_method"] if m["answer_kept_n_measured"] or m["answer_token_recall_n_measured"]]
    if measured:
        lines += [
            "## Answer kept in the selection",
            "",
            "answer_kept: answer items kept whole; answer_token_recall: answer tokens kept (mean over measured rows).",
            "",
        ]
        rows = [
            [
                str(m["method"]),
                _fmt(m["answer_kept"]),
                _fmt(m["answer_token_recall"]),
                str(max(m["answer_kept_n_measured"], m["answer_token_recall_n_measured"])),
            ]
            for m in measured
        ]
        lines += [*_table(["method", "answer_kept", "answer_token_recall", "n measured"], rows), ""]

    total = s["n"] + s["errors"]
    lines += ["## Failed rows", "", f"{s['errors']} of {total} rows failed (left out of the means)."]
    if s["errors"]:
        failed = [m for m in s["per_method"] if m["errors"]]
        lines += ["", *(f"- {m['method']}: {m['errors']}" for m in failed)]
        # A few distinct messages, enough to tell one systematic failure from scattered ones.
        messages = _first_seen((r for r in records if r.get("error") is not None), "error")
        lines += ["", "First errors:", "", *(f"- `{str(e)[:200]}`" for e in messages[:5])]
    return "\n".join(lines) + "\n"


# ---- all outputs --------------------------------------------------------------------------------------------------


def write_reports(records: Sequence[Record], meta: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write every output into out_dir; returns the paths written (budget_curves.png only when it applies)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        write_json(records, meta, out / "results.json"),
        write_csv(records, out / "results.csv"),
        plot_heatmaps(records, out / "heatmap.png"),
    ]
    if plot_budget_curves(records, out / "budget_curves.png"):
        paths.append(out / "budget_curves.png")
    summary_md = out / "summary.md"
    summary_md.write_text(markdown_summary(records, meta), encoding="utf-8")
    paths.append(summary_md)
    return paths
