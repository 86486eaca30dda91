"""Benchmark reports redrawn from their saved rows: the published summary follows from the raw
measurements (no GPU or model needed)."""

from __future__ import annotations

import json
from pathlib import Path

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
