"""Benchmark reports redrawn from their saved rows: the published summary follows from the raw
measurements (no GPU or model needed)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from bench import gpu_prefill
from bench.common import RESULTS_DIR


def test_the_gpu_prefill_summary_follows_from_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "gpu_prefill.json"
    gpu_prefill.main(["--from-json", str(RESULTS_DIR / "gpu_prefill.json"), "--out", str(out), "--no-doc"])
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    rows = result["rows"]
    for row in result["summary"]:
        same = [
            r for r in rows if (r["model"], r["length"], r["method"]) == (row["model"], row["length"], row["method"])
        ]
        assert row["n"] == len(same) > 0
        if row["method"] == "none":
            assert row["speedup_vs_none"] == 1.0 and row["kept_tokens"] == row["prompt_tokens"]
        else:  # a method's kept tokens are its budget, and the ratio pairs prompts by repeat
            assert row["kept_tokens"] == 1024
            base = {
                r["repeat"]: r["ttft_ms"]
                for r in rows
                if (r["model"], r["length"], r["method"]) == (row["model"], row["length"], "none")
            }
            ratios = sorted(base[r["repeat"]] / r["ttft_ms"] for r in same)
            assert row["speedup_vs_none"] == ratios[len(ratios) // 2]
    section = gpu_prefill.doc_section(result)
    assert section.startswith(gpu_prefill.DOC_HEADING) and section.count("\n| llama-3.1-8b |") == 16


# Every benchmark's plot, drawn again from its committed result (bench.common.figure sets each up).
PLOTS = [
    ("attention", "attention_smollm2.json", None),
    ("batching", "batching_smollm2.json", None),
    ("decode_attention", "decode_attention.json", None),
    ("dtype_eval", "dtype_eval_smollm2.json", None),
    ("fallback_curve", "eval_smollm2_positions/fallback_gemfilter_256.json", None),
    ("first_request", "first_request_smollm2.json", None),
    ("gpu_prefill", "gpu_prefill.json", None),
    ("kv_methods", "kv_methods_smollm2.json", None),
    ("kv_shared", "kv_shared_smollm2_8000.json", None),
    ("peers", "peers_smollm2.json", None),
    ("prefill", "prefill_smollm2.json", None),
    ("prefill_memory", "prefill_memory_smollm2_allocator.json", None),
    ("replicas", "replicas_smollm2.json", "table"),
    ("soak", "soak_smollm2.json", None),
]


@pytest.mark.parametrize(("module", "result", "key"), PLOTS, ids=[p[0] for p in PLOTS])
def test_each_benchmark_plot_redraws_from_its_result(tmp_path: Path, module: str, result: str, key: str | None) -> None:
    data = json.loads((RESULTS_DIR / result).read_text())
    out = tmp_path / "plot.png"
    importlib.import_module(f"bench.{module}").plot(data[key] if key else data, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
