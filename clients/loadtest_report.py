"""Load-test results: per-request records, summary statistics, tables, JSON/CSV files and plots.

Stdlib only at import time (matplotlib loads inside ``write_plots``) so the CLI stays fast.
Percentiles interpolate linearly between order statistics, as numpy's default does, so the
numbers match what vLLM's ``benchmark_serving`` prints for the same samples.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2e")


@dataclass
class RequestRecord:
    """One request as the client saw it (times in ms; ``start_s`` from the start of its method's run)."""

    method: str
    index: int
    start_s: float
    ok: bool = False
    error_type: str | None = None
    error_message: str | None = None
    request_id: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    kept_tokens: int | None = None
    expected: str | None = None
    correct: bool | None = None
    output_text: str = ""
    server_metrics: dict[str, Any] | None = None

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: ``(e2e - ttft) / (tokens - 1)``."""
        if not self.ok or self.ttft_ms is None or self.e2e_ms is None or self.output_tokens < 2:
            return None
        return (self.e2e_ms - self.ttft_ms) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_ms": self.tpot_ms}


# ---- statistics --------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """count, mean, p50, p90, p99 (``None`` when there are no values)."""
    present = [float(v) for v in values if v is not None]
    out: dict[str, float | int | None] = {"count": len(present), "mean": statistics.fmean(present) if present else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(present, q) if present else None
    return out


def parse_slo(text: str | None) -> dict[str, float]:
    """``"ttft:500,e2e:3000"`` -> ``{"ttft": 500.0, "e2e": 3000.0}`` (milliseconds)."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo takes NAME:MS pairs with NAME in {', '.join(SLO_METRICS)}; got {part!r}")
        try:
            slo[name] = float(value)
        except ValueError:
            raise ValueError(f"--slo {name}: {value!r} is not a number of milliseconds") from None
        if slo[name] <= 0:
            raise ValueError(f"--slo {name} must be positive")
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.ok:
        return False
    measured = {"ttft": record.ttft_ms, "tpot": record.tpot_ms, "e2e": record.e2e_ms}
    # A request with one output token has no TPOT; it cannot miss a TPOT target.
    return all(measured[name] is None or measured[name] <= limit for name, limit in slo.items())  # type: ignore[operator]


def run_duration_s(records: Sequence[RequestRecord]) -> float:
    """From the first request sent to the last one finished."""
    ends = [r.start_s + (r.e2e_ms or 0.0) / 1000 for r in records]
    return max(ends) - min(r.start_s for r in records) if records else 0.0


def server_metric_stats(records: Sequence[RequestRecord]) -> dict[str, dict[str, float | int | None]]:
    """Each numeric metric the server reported (GemServe's ``metrics``), described across requests."""
    names = sorted({k for r in records if r.server_metrics for k, v in r.server_metrics.items() if _is_number(v)})
    return {name: describe(r.server_metrics.get(name) for r in records if r.server_metrics) for name in names}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summarize(records: Sequence[RequestRecord], slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The summary of one method's run: latency percentiles, throughput, goodput, accuracy, errors."""
    done = [r for r in records if r.ok]
    duration = run_duration_s(records)
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    checked = [r for r in done if r.correct is not None]
    summary: dict[str, Any] = {
        "requests": {
            "sent": len(records),
            "completed": len(done),
            "failed": len(records) - len(done),
            "errors": dict(Counter(r.error_type for r in records if not r.ok)),
        },
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration > 0 else None,
        "output_token_throughput": output_tokens / duration if duration > 0 else None,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "ttft_ms": describe(r.ttft_ms for r in done),
        "tpot_ms": describe(r.tpot_ms for r in done),
        "itl_ms": describe(itl for r in done for itl in r.itl_ms),
        "e2e_ms": describe(r.e2e_ms for r in done),
        "prompt_tokens": describe(r.prompt_tokens for r in done),
        "kept_tokens": describe(r.kept_tokens for r in done),
        "accuracy": {"checked": len(checked), "correct": sum(1 for r in checked if r.correct)} if checked else None,
        "goodput": None,
        "server_metrics": server_metric_stats(done),
    }
    if summary["accuracy"]:
        summary["accuracy"]["fraction"] = summary["accuracy"]["correct"] / len(checked)
    if slo:
        good = sum(1 for r in records if meets_slo(r, slo))
        summary["goodput"] = {
            "slo_ms": dict(slo),
            "good_requests": good,
            "fraction": good / len(records) if records else None,
            "requests_per_s": good / duration if duration > 0 else None,
        }
    return summary


# ---- tables and files --------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _align(cell: str, width: int, column: int) -> str:
    return cell.rjust(width) if column else cell.ljust(width)  # names left, numbers right


def format_table(summaries: dict[str, dict[str, Any]]) -> str:
    """One row per method, side by side (latencies in ms)."""
    header = [
        "method",
        "ok/sent",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "ITL p50",
        "E2E p50",
        "E2E p99",
        "req/s",
        "out tok/s",
        "kept",
        "accuracy",
        "goodput",
    ]
    rows = [header]
    for label, s in summaries.items():
        accuracy = s["accuracy"]
        goodput = s["goodput"]
        rows.append(
            [
                label,
                f"{s['requests']['completed']}/{s['requests']['sent']}",
                _fmt(s["ttft_ms"]["p50"]),
                _fmt(s["ttft_ms"]["p99"]),
                _fmt(s["tpot_ms"]["p50"], 1),
                _fmt(s["itl_ms"]["p50"], 1),
                _fmt(s["e2e_ms"]["p50"]),
                _fmt(s["e2e_ms"]["p99"]),
                _fmt(s["request_throughput"], 2),
                _fmt(s["output_token_throughput"], 1),
                _fmt(s["kept_tokens"]["mean"]),
                f"{accuracy['correct']}/{accuracy['checked']}" if accuracy else "-",
                f"{goodput['fraction']:.0%}" if goodput and goodput["fraction"] is not None else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(_align(cell, width, i) for i, (cell, width) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    errors = {label: s["requests"]["errors"] for label, s in summaries.items() if s["requests"]["errors"]}
    for label, counts in errors.items():
        lines.append(f"errors ({label}): " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items())))
    return "\n".join(lines)


CSV_FIELDS = [
    "method",
    "index",
    "ok",
    "error_type",
    "request_id",
    "start_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "itl_mean_ms",
    "prompt_tokens",
    "output_tokens",
    "kept_tokens",
    "expected",
    "correct",
    "server_ttft_ms",
    "server_prefill_ms",
    "server_peak_memory_bytes",
]


def csv_row(record: RequestRecord) -> dict[str, Any]:
    server = record.server_metrics or {}
    row = {name: getattr(record, name, None) for name in CSV_FIELDS}
    row["tpot_ms"] = record.tpot_ms
    row["itl_mean_ms"] = statistics.fmean(record.itl_ms) if record.itl_ms else None
    row["server_ttft_ms"] = server.get("ttft_ms")
    row["server_prefill_ms"] = server.get("prefill_ms")
    row["server_peak_memory_bytes"] = server.get("peak_memory_bytes")
    return row


def write_results(
    output_dir: Path,
    config: dict[str, Any],
    records: dict[str, list[RequestRecord]],
    summaries: dict[str, dict[str, Any]],
    interrupted: bool = False,
) -> dict[str, Path]:
    """results.json, requests.csv and the PNG plots; returns the paths written by kind."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "csv": output_dir / "requests.csv"}
    document = {
        "config": config,
        "interrupted": interrupted,
        "summary": summaries,
        "requests": [r.to_dict() for method_records in records.values() for r in method_records],
    }
    paths["json"].write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for method_records in records.values():
            writer.writerows(csv_row(r) for r in method_records)
    paths.update(write_plots(output_dir, records))
    return paths


# ---- plots -------------------------------------------------------------------------------------
def token_times_s(record: RequestRecord) -> list[float]:
    """When each streamed chunk arrived, in seconds from the start of the run."""
    if not record.ok or record.ttft_ms is None:
        return []
    times, now = [], record.start_s + record.ttft_ms / 1000
    times.append(now)
    for gap in record.itl_ms:
        now += gap / 1000
        times.append(now)
    return times


def write_plots(output_dir: Path, records: dict[str, list[RequestRecord]]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    paths = {
        "latency_cdf": output_dir / "latency_cdf.png",
        "ttft_by_method": output_dir / "ttft_by_method.png",
        "throughput": output_dir / "throughput_over_time.png",
    }
    ok = {label: [r for r in rs if r.ok] for label, rs in records.items()}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (metric, title) in zip(
        axes, [("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E latency")], strict=True
    ):
        for label, rs in ok.items():
            values = sorted(v for r in rs if (v := getattr(r, metric)) is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(paths["latency_cdf"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(ok)), 4.5))
    labels = list(ok)
    ax.boxplot([[r.ttft_ms for r in ok[label]] or [math.nan] for label in labels], tick_labels=labels)
    ax.set(title="TTFT by method", ylabel="ms")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["ttft_by_method"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, rs in ok.items():
        # Each streamed chunk stands for output_tokens / chunks tokens of its request (usually 1).
        weighted = sorted((t, r.output_tokens / len(ts)) for r in rs if (ts := token_times_s(r)) for t in ts)
        if not weighted:
            continue
        first, span = weighted[0][0], weighted[-1][0] - weighted[0][0]
        width = max(span / 40, 0.05)  # about 40 bins across the run
        tokens: Counter[int] = Counter()
        for t, weight in weighted:
            tokens[int((t - first) // width)] += weight
        bins = range(max(tokens) + 1)
        ax.plot([(b + 0.5) * width for b in bins], [tokens[b] / width for b in bins], marker=".", label=label)
    ax.set(title="Output throughput over time", xlabel="s since the first token", ylabel="output tokens/s")
    ax.grid(alpha=0.3)
    if ok:
        ax.legend()
    fig.tight_layout()
    fig.savefig(paths["throughput"], dpi=110)
    plt.close(fig)
    return paths
