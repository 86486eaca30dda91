"""evals/report.py on hand-made records: means against hand-computed values, CSV round trip, PNGs, markdown."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from evals import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LENGTHS = (1024, 4096)
DEPTHS = (0.0, 0.5, 1.0)
# Scores per method over (1024: depth 0, 0.5, 1), then (4096: depth 0, 0.5, 1).
SCORES: dict[str, list[float]] = {
    "none": [1, 1, 1, 1, 1, 1],
    "gemfilter:256": [1, 0, 1, 0, 0, 1],
    "gemfilter:1024": [1, 1, 1, 1, 0, 1],
    "gemfilter:4096": [1, 1, 1, 1, 1, 1],
    "snapkv:256": [0, 0, 1, 0, 0, 0],
    "snapkv:1024": [1, 0, 1, 0, 0, 1],  # its (4096, 0.5) row is the failed one, below
    "snapkv:4096": [1, 1, 1, 1, 1, 0],
}


def record(method: str, length: int, depth: float | None, score: float, **over: Any) -> dict[str, Any]:
    name, _, budget = method.partition(":")
    gemfilter = name == "gemfilter"
    row = {
        "task": "niah_single",
        "haystack": "noise",
        "style": "chat",
        "target_tokens": length,
        "prompt_tokens": length - 7,
        "depth": depth,
        "seed": 0,
        "uid": f"niah_single-{length}-{depth}",
        "method": method,
        "method_name": name,
        "budget": int(budget) if budget else None,
        "variant": name,
        "score": float(score),
        # Only gemfilter measures what its selection kept: kept = score, recall = 0.5 + score / 2.
        "answer_kept": float(score) if gemfilter else None,
        "answer_token_recall": 0.5 + score / 2 if gemfilter else None,
        "output": "The magic number is 1234567." if score else "I don't know,\nsorry.",
        "answers": ["1234567"],
        "kept_tokens": int(budget) if budget else None,
        "layer": 13 if gemfilter else None,
        "ttft_ms": 100.0,
        "error": None,
    }
    row.update(over)
    return row


@pytest.fixture
def records() -> list[dict[str, Any]]:
    rows = []
    for method, scores in SCORES.items():
        grid = [(n, d) for n in LENGTHS for d in DEPTHS]
        for (length, depth), score in zip(grid, scores, strict=True):
            if method == "snapkv:1024" and (length, depth) == (4096, 0.5):
                continue
            rows.append(record(method, length, depth, score))
    rows.append(
        record("none", 1024, None, 0.5, task="cwe", uid="cwe-1024", answers=["apple", "pear"], output="apple, fig")
    )
    # Scored 0 but failed: must not pull snapkv:1024 at 4096 down from 0.5.
    rows.append(record("snapkv:1024", 4096, 0.5, 0.0, output="", error="HTTP 500: boom"))
    return rows


def by(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    (row,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return row


def test_summary_means(records):
    s = report.summary(records)
    assert s["n"] == len(records) - 1 and s["errors"] == 1
    assert s["methods"] == list(SCORES)  # first-seen order
    assert s["tasks"] == ["niah_single", "cwe"]
    assert s["lengths"] == [1024, 4096]

    per = {m["method"]: m for m in s["per_method"]}
    assert per["none"]["mean_score"] == pytest.approx(6.5 / 7)  # 6 niah at 1 + the cwe row at 0.5
    assert per["gemfilter:256"]["mean_score"] == pytest.approx(0.5)
    assert per["gemfilter:1024"]["mean_score"] == pytest.approx(5 / 6)
    assert per["snapkv:256"]["mean_score"] == pytest.approx(1 / 6)
    assert per["snapkv:1024"]["mean_score"] == pytest.approx(3 / 5)
    assert (per["snapkv:1024"]["n"], per["snapkv:1024"]["errors"]) == (5, 1)
    assert (per["none"]["budget"], per["gemfilter:1024"]["budget"]) == (None, 1024)

    cells = {(c["method"], c["target_tokens"]): c for c in s["by_length"]}
    assert [(c["method"], c["target_tokens"]) for c in s["by_length"]][:4] == [
        ("none", 1024),
        ("none", 4096),
        ("gemfilter:256", 1024),
        ("gemfilter:256", 4096),
    ]
    assert cells["none", 1024]["mean_score"] == pytest.approx(3.5 / 4)
    assert cells["gemfilter:256", 1024]["mean_score"] == pytest.approx(2 / 3)
    assert cells["gemfilter:256", 4096]["mean_score"] == pytest.approx(1 / 3)
    assert cells["snapkv:1024", 4096]["mean_score"] == pytest.approx(0.5)
    assert (cells["snapkv:1024", 4096]["n"], cells["snapkv:1024", 4096]["errors"]) == (2, 1)

    tasks = {(c["task"], c["method"]): c for c in s["by_task"]}
    assert tasks["cwe", "none"]["mean_score"] == pytest.approx(0.5)
    assert tasks["niah_single", "none"]["mean_score"] == pytest.approx(1.0)
    assert ("cwe", "gemfilter:256") not in tasks  # not run: no empty cell

    assert per["gemfilter:256"]["answer_kept"] == pytest.approx(0.5)
    assert per["gemfilter:256"]["answer_token_recall"] == pytest.approx(0.75)
    assert per["gemfilter:1024"]["answer_kept_n_measured"] == 6
    assert per["snapkv:256"]["answer_kept"] is None and per["snapkv:256"]["answer_kept_n_measured"] == 0
    assert report.summary(records) == s  # deterministic


def test_csv_round_trip(records, tmp_path):
    path = report.write_csv(records, tmp_path / "results.csv")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames or ()) == report.COLUMNS
    assert len(rows) == len(records)
    cwe = by(rows, task="cwe")
    assert cwe["answers"] == "apple | pear"
    assert cwe["depth"] == "" and cwe["budget"] == ""
    assert float(cwe["score"]) == 0.5
    failed = by(rows, error="HTTP 500: boom")
    assert failed["method"] == "snapkv:1024"
    # An output with a comma and a newline survives the quoting.
    assert by(rows, method="snapkv:256", target_tokens="1024", depth="0.0")["output"] == "I don't know,\nsorry."


def test_json(records, tmp_path):
    meta = {"model": "smollm2-135m-instruct", "seed": 0, "out": tmp_path}  # a Path must not break the dump
    data = json.loads(report.write_json(records, meta, tmp_path / "results.json").read_text())
    assert data["meta"]["model"] == "smollm2-135m-instruct"
    assert len(data["records"]) == len(records)
    assert data["summary"] == json.loads(json.dumps(report.summary(records)))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000


def test_write_reports(records, tmp_path):
    meta = {
        "model": "smollm2-135m-instruct",
        "style": "chat",
        "tasks": ["niah_single", "cwe"],
        "lengths": [1024, 4096],
        "depths": [0.0, 0.5, 1.0],
        "seed": 0,
        "started": "2025-01-01T10:00:00",
        "finished": "2025-01-01T10:05:00",
        "elapsed_s": 300.0,
        "loadavg": [1.5, 1.25, 1.0],
    }
    out = tmp_path / "run"
    paths = report.write_reports(records, meta, out)
    names = ["results.json", "results.csv", "heatmap.png", "budget_curves.png", "summary.md"]
    assert paths == [out / n for n in names]
    assert all(p.exists() for p in paths)
    assert_png(out / "heatmap.png")
    assert_png(out / "budget_curves.png")

    md = (out / "summary.md").read_text()
    for text in (
        "smollm2-135m-instruct",
        "niah_single, cwe",
        "2025-01-01T10:05:00",
        "300 s (5.0 min)",
        "1.50 / 1.25 / 1.00",
        "| none | 0.88 (4) | 1.00 (3) | 0.93 (7) |",  # method x length, with n
        "| gemfilter:256 | 0.67 (3) | 0.33 (3) | 0.50 (6) |",
        "| snapkv:1024 | 0.67 (3) | 0.50 (2) | 0.60 (5) |",  # the failed row is out of the mean
        "| cwe | 0.50 |",  # task x method
        "| gemfilter:256 | 0.50 | 0.75 | 6 |",  # answer kept / recall
        "1 of 43 rows failed",
        "HTTP 500: boom",
    ):
        assert text in md, text
    assert "| snapkv:256 | –" not in md  # snapkv measured nothing: not in the answer-kept table


def test_budget_curves_skipped_without_two_budgets(records, tmp_path):
    one_budget = [r for r in records if r["method"] in ("none", "gemfilter:1024", "snapkv:4096")]
    assert report.plot_budget_curves(one_budget, tmp_path / "curves.png") is False
    assert not (tmp_path / "curves.png").exists()
    paths = report.write_reports(one_budget, {"model": "m"}, tmp_path)
    assert tmp_path / "budget_curves.png" not in paths
    assert not (tmp_path / "budget_curves.png").exists()


def test_import_does_not_load_matplotlib():
    code = "import sys, evals.report; print('matplotlib' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_budget_tables_give_the_curves_as_numbers(records):
    from evals.report import budget_tables

    text = "\n".join(budget_tables(records))
    # snapkv at 1024 tokens, depths 0/0.5/1: budget 256 -> 0,0,1; 1024 -> 1,0,1; 4096 -> 1,1,1.
    assert "| snapkv | 0.33 (3) | 0.67 (3) | 1.00 (3) |  |" in text
    assert "4096 tokens:" in text
