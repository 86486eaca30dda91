"""Every Prometheus collector of the server, declared in one place.

Each app gets its own :class:`CollectorRegistry` (tests run several apps in one process).
Labels: ``model``, ``backend``, ``method``; ``gemserve_requests_total`` adds ``status`` (the
HTTP status, or the status of the error event when a stream fails midway). ``model`` is
always the served model name (``--served-model-name``, else the engine's: what /v1/models
lists), so every series joins with every other. The gauges are read from the engine at
scrape time and carry ``model`` and ``backend`` only: a queue slot belongs to no method.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.engine.base import AsyncEngine
from server.engine.types import GenerationResult

LABELS = ("model", "backend", "method")
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
BYTES_BUCKETS = tuple(float(2**p) for p in range(16, 36, 2))  # 64 KiB .. 16 GiB
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class EngineLoadCollector(Collector):
    """``gemserve_requests_running`` / ``gemserve_requests_waiting``, read live from the engine."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.model = ""  # the served model name, set with the engine

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("gemserve_requests_running", "Requests generating now", labels=LABELS[:2])
        waiting = GaugeMetricFamily("gemserve_requests_waiting", "Requests queued for a slot", labels=LABELS[:2])
        if self.engine is not None:
            labels = [self.model, self.engine.backend]
            running.add_metric(labels, self.engine.num_running)
            waiting.add_metric(labels, self.engine.num_waiting)
        yield running
        yield waiting
        yield from self.batch_gauges()

    def batch_gauges(self) -> Iterator[Metric]:
        """The hf batch's size and the cache tokens it reserves and its queue wants (engines
        without a batch of their own, vllm, report none: vLLM exports its own)."""
        families = {
            "batch_size": GaugeMetricFamily(
                "gemserve_batch_size", "Requests in the last batch step", labels=LABELS[:2]
            ),
            "running_tokens": GaugeMetricFamily(
                "gemserve_batch_running_tokens", "KV-cache tokens the requests in the batch hold", labels=LABELS[:2]
            ),
            "waiting_tokens": GaugeMetricFamily(
                "gemserve_batch_waiting_tokens", "KV-cache tokens the queued requests will reserve", labels=LABELS[:2]
            ),
            "preemptions": CounterMetricFamily(
                "gemserve_batch_preemptions",
                "Requests whose cache was dropped to make room (recomputed when they run again)",
                labels=LABELS[:2],
            ),
        }
        gauges = getattr(self.engine, "batch_gauges", None)
        if gauges is not None:
            for key, value in gauges().items():
                families[key].add_metric([self.model, self.engine.backend], value)  # type: ignore[union-attr]
        yield from families.values()


# ---- the shadow check (--shadow-fraction, server/engine/hf_async.py ShadowCheck) ---------------------
class ShadowCheckCollector(Collector):
    """``gemserve_shadow_checks_total{method, budget, agree}``: sampled compressed answers rerun with
    full attention while the batch was idle, by whether the two answers agree (``agree`` "true" or
    "false"); ``gemserve_shadow_skipped_total{reason}``: sampled ones not compared (``not_greedy``,
    ``queue_full``, ``too_long``, ``rejected``, ``failed``, ``shutdown``). Read from the engine's
    counts at scrape time; an engine without a shadow check (vllm, or the setting 0) exports none."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.model = ""

    def collect(self) -> Iterator[Metric]:
        checks = CounterMetricFamily(
            "gemserve_shadow_checks",
            "Sampled compressed answers rerun with full attention when idle, by whether the answers agree",
            labels=(*LABELS, "budget", "agree"),
        )
        skipped = CounterMetricFamily(
            "gemserve_shadow_skipped",
            "Sampled compressed answers the shadow check did not compare, by reason",
            labels=(*LABELS[:2], "reason"),
        )
        counts = getattr(self.engine, "shadow_counts", None)
        if counts is not None:
            agreed, dropped = counts()
            backend = self.engine.backend  # type: ignore[union-attr]
            for (method, budget, agree), value in sorted(agreed.items()):
                checks.add_metric([self.model, backend, method, budget, agree], value)
            for reason, value in sorted(dropped.items()):
                skipped.add_metric([self.model, backend, reason], value)
        yield checks
        yield skipped


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.ttft = Histogram(
            "gemserve_time_to_first_token_seconds",
            "Request accepted -> first token produced",
            LABELS,
            buckets=SECONDS_BUCKETS,
            registry=reg,
        )
        self.e2e = Histogram(
            "gemserve_e2e_request_latency_seconds",
            "Request accepted -> last token produced",
            LABELS,
            buckets=SECONDS_BUCKETS,
            registry=reg,
        )
        self.selection = Histogram(
            "gemserve_selection_seconds",
            "Time the compression method spent choosing what to keep",
            LABELS,
            buckets=SECONDS_BUCKETS,
            registry=reg,
        )
        self.prompt_tokens = Histogram(
            "gemserve_prompt_tokens", "Prompt length before compression", LABELS, buckets=TOKEN_BUCKETS, registry=reg
        )
        self.kept_tokens = Histogram(
            "gemserve_kept_tokens",
            "Prompt tokens kept by compression: tokens the model saw, or KV entries per head (KV methods)",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.kept_tokens_union = Histogram(
            "gemserve_kept_tokens_union",
            "KV methods: prompt positions at least one layer's head holds after prefill",
            LABELS,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        self.kv_cache_bytes = Histogram(
            "gemserve_kv_cache_bytes", "KV cache size after prefill", LABELS, buckets=BYTES_BUCKETS, registry=reg
        )
        self.confidence = Histogram(
            "gemserve_selection_confidence",
            "GemFilter: share of the filter layer's attention the budget's selection held (compression.confidence)",
            LABELS,
            buckets=CONFIDENCE_BUCKETS,
            registry=reg,
        )
        self.fallbacks = Counter(
            "gemserve_selection_fallbacks_total",
            "GemFilter selections a low confidence widened (compression.fallback), by what they widened to",
            (*LABELS, "to"),
            registry=reg,
        )
        self.requests = Counter(
            "gemserve_requests_total", "Generation requests by outcome", (*LABELS, "status"), registry=reg
        )
        self.generation_tokens = Counter("gemserve_generation_tokens_total", "Tokens generated", LABELS, registry=reg)
        self.engine_load = EngineLoadCollector()
        reg.register(self.engine_load)
        self.shadow = ShadowCheckCollector()
        reg.register(self.shadow)

    def bind_engine(self, engine: AsyncEngine, model: str) -> None:
        """``model``: the served model name, the gauges' label, as every other series'."""
        self.engine_load.engine = engine
        self.engine_load.model = model
        self.shadow.engine = engine
        self.shadow.model = model

    def observe_result(self, model: str, backend: str, result: GenerationResult) -> None:
        """``model``: the served model name (``ServerState.served_model_name()``), as everywhere."""
        labels = (model, backend, result.compression.method)
        m = result.metrics
        self.ttft.labels(*labels).observe(m.ttft_ms / 1000.0)
        self.e2e.labels(*labels).observe(m.e2e_ms / 1000.0)
        self.selection.labels(*labels).observe(result.compression.select_ms / 1000.0)
        self.prompt_tokens.labels(*labels).observe(result.compression.prompt_tokens)
        self.kept_tokens.labels(*labels).observe(result.compression.kept_tokens)
        if result.compression.kept_tokens_union is not None:
            self.kept_tokens_union.labels(*labels).observe(result.compression.kept_tokens_union)
        self.kv_cache_bytes.labels(*labels).observe(m.kv_cache_bytes)
        if result.compression.confidence is not None:
            self.confidence.labels(*labels).observe(result.compression.confidence)
        if result.compression.fallback is not None:
            to = "none" if result.compression.fallback == "none" else "budget"
            self.fallbacks.labels(*labels, to).inc()

    def count_generated_tokens(self, model: str, backend: str, method: str, tokens: int) -> None:
        """Every decoded token, also those of a request the client left (the engine counts them)."""
        self.generation_tokens.labels(model, backend, method).inc(tokens)

    def count_request(self, model: str, backend: str, method: str, status: int) -> None:
        self.requests.labels(model, backend, method, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
