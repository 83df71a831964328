"""Prometheus metrics of the server, in a registry of its own (no process-wide state).

Latencies are histograms observed as tokens are produced; the engine's counters
(pages and bytes per tier, fetches, stall seconds, selection, and whatever later
subsystems add to `LLMEngine.stats()`) are read from the engine loop's latest
snapshot at scrape time, each numeric one once: under its own name (`_NAMED`), else
as `speckv_engine_<name>` — a gauge if it is a level (`GAUGES`), else a counter
(`speckv_engine_<name>_total`).
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from speckv.util import is_number

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.0, 5.0, 10.0, 30.0, 60.0)

# engine stats shown under a name of their own (besides, never also, speckv_engine_*)
_NAMED = {
    "requests_running": ("speckv_requests_running", "requests in the running batch"),
    "requests_waiting": ("speckv_requests_waiting", "requests queued for memory or a batch place"),
    "generation_tokens_per_second": ("speckv_generation_tokens_per_second",
                                     "generated tokens per second over the last 10 s"),
    "device_pages_free": ("speckv_device_pages_free", "free pages in the DEVICE tier"),
    "device_pages_total": ("speckv_device_pages_capacity", "pages in the DEVICE tier"),
    "tier_stall_seconds": ("speckv_stall_seconds", "seconds attention waited for pages to be "
                                                   "fetched"),
    "pool_available": ("speckv_pool_available", "1 while the KV pool can serve, 0 once lost"),
    "valkey_available": ("speckv_valkey_available", "1 while the Valkey server of a shared "
                                                    "pool answers, 0 while not (degraded)"),
    "prefetch_hit_rate": ("speckv_prefetch_hit_rate", "prefetched pages used / prefetched pages"),
    "prefix_cache_hit_rate": ("speckv_prefix_cache_hit_rate",
                              "prompt tokens reused from the prefix cache / reusable prompt "
                              "tokens (whole pages, the last token excluded), since start"),
}

# LLMEngine.stats() numbers that are levels (they go down as well as up); every other
# number is a count of what happened since the engine started, exported as a counter
GAUGES = frozenset({
    "device_pages_total", "device_pages_used", "device_pages_free", "device_kv_bytes_budget",
    "device_kv_bytes_used", "page_bytes", "requests_running", "requests_waiting",
    "requests_in_flight", "generation_tokens_per_second", "pool_available",
    "device_pages_committed", "pool_pages_reserved", "device_pages_pooled_resident",
    "pool_slots_total", "pool_slots_used", "pool_slot_bytes", "pool_encoded_bytes",
    "summary_bytes", "selection_fraction", "prefetch_pages_total", "prefetch_pages_used_now",
    "prefetch_bytes_used", "prefetch_waste", "prefetch_precision", "prefetch_recall",
    "prefetch_hit_rate", "selection_recall", "selection_oracle_overlap",
    "prefix_cache_hit_rate", "prefix_cache_pages", "prefix_cache_pages_idle",
    "prefix_cache_device_pages", "prefix_cache_device_pages_idle", "prefix_cache_device_bytes",
    "prefix_cache_pool_bytes", "valkey_available",
})


def _gauge_name(key: str) -> str:
    """speckv_engine_<key>; a level named *_total (a capacity) becomes *_capacity, since
    Prometheus reserves _total for counters."""
    return f"speckv_engine_{key.removesuffix('_total')}_capacity" if key.endswith("_total") \
        else f"speckv_engine_{key}"


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._snapshot()
        for key, value in stats.items():
            if not is_number(value):
                continue
            name, text = _NAMED.get(key, (None, f"LLMEngine.stats()['{key}']"))
            if key in GAUGES:
                yield GaugeMetricFamily(name or _gauge_name(key), text, value=float(value))
            else:
                yield CounterMetricFamily(name or f"speckv_engine_{key}", text, value=float(value))
        tiers = GaugeMetricFamily("speckv_tier_bytes", "bytes held per tier", labels=["tier"])
        tiers.add_metric(["device"], float(stats.get("device_kv_bytes_used", 0)))
        if "pool_encoded_bytes" in stats:
            tiers.add_metric(["pool"], float(stats["pool_encoded_bytes"]))
        yield tiers
        if stats.get("device_pages_total"):
            used = stats.get("device_pages_used", 0) - stats.get("prefix_cache_device_pages_idle", 0)
            yield GaugeMetricFamily(
                "speckv_kv_cache_usage_ratio", "fraction of DEVICE pages in use (0 to 1), as "
                "vLLM's kv_cache_usage_perc (idle cached pages count as free)",
                value=used / stats["device_pages_total"])


class ServerMetrics:
    """Counters and histograms the engine loop updates (prometheus_client is thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "speckv_time_to_first_token_seconds", "arrival to first generated token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "speckv_inter_token_latency_seconds", "time between generated tokens",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram(
            "speckv_request_latency_seconds", "arrival to finish",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("speckv_requests", "finished requests", ["finish_reason"],
                                registry=r)
        self.generation_tokens = Counter("speckv_generation_tokens", "generated tokens",
                                         registry=r)
        self.prompt_tokens = Counter("speckv_prompt_tokens", "prompt tokens of finished requests",
                                     registry=r)
        self.rejected = Counter("speckv_requests_rejected", "requests answered 429 (queue full)",
                                registry=r)
        self.aborted = Counter("speckv_requests_aborted", "requests aborted (client gone)",
                               registry=r)
        self._latency_sum = 0.0
        self._latency_count = 0

    def watch(self, snapshot: Callable[[], dict]) -> None:
        """Exports the engine stats that `snapshot()` returns at each scrape."""
        self.registry.register(_EngineCollector(snapshot))

    def request_finished(self, finish_reason: str | None, seconds: float, prompt_tokens: int) -> None:
        self.requests.labels(finish_reason or "unknown").inc()
        self.request_latency.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self._latency_sum += seconds
        self._latency_count += 1

    def mean_request_seconds(self) -> float | None:
        return self._latency_sum / self._latency_count if self._latency_count else None

    def render(self) -> bytes:
        return generate_latest(self.registry)
