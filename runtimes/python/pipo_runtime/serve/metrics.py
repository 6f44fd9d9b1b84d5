"""GET /metrics: Prometheus text from one registry per app. The engine's counters and gauges
are read from `engine.stats()` at scrape time (one source of truth); latencies are histograms the
server observes per request."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "pipo_"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
# EngineStats field -> (metric, kind, help)
ENGINE_METRICS = {
    "running": ("requests_running", "gauge", "requests in the running batch"),
    "waiting": ("requests_waiting", "gauge", "requests waiting for a row"),
    "prompt_tokens": ("prompt_tokens", "counter", "prompt tokens prefilled"),
    "generated_tokens": ("generation_tokens", "counter", "user tokens generated"),
    "steps": ("engine_steps", "counter", "decode steps the engine ran"),
    "rows_per_step": ("batch_rows", "gauge", "rows in the last step's batch"),
    "padding_ratio": ("padding_ratio", "gauge", "padding share of the last step's batch"),
    "commits": ("commits", "counter", "pairs whose second token the gate kept"),
    "pairs": ("pairs", "counter", "pairs emitted"),
    "prefix_hits": ("prefix_cache_hits", "counter", "requests that reused a cached prefix"),
    "prefix_misses": ("prefix_cache_misses", "counter", "requests without a cached prefix"),
    "cancelled": ("requests_cancelled", "counter", "requests cancelled (client gone, "
                                                   "drain timeout)"),
}


class EngineCollector:
    """Collects `engine.stats()` (None while the model loads: nothing reported)."""

    def __init__(self, engine_ref):
        self._engine = engine_ref  # callable -> Engine | None

    def collect(self):
        engine = self._engine()
        if engine is None:
            return
        stats = engine.stats()
        for field, (name, kind, doc) in ENGINE_METRICS.items():
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(PREFIX + name, doc, value=getattr(stats, field))
        rate = stats.commits / stats.pairs if stats.pairs else 0.0
        yield GaugeMetricFamily(PREFIX + "commit_rate", "commits / pairs since start",
                                value=rate)


class ServerMetrics:
    """The server's own metrics (latencies, requests by outcome) and the engine's."""

    def __init__(self, engine_ref):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "request arrival to the "
                              "first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "time between two "
                             "chunks of a request, per token they carry",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "request arrival to its "
                             "last token", buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter(PREFIX + "requests", "requests answered, by status and finish "
                                "reason", ["status", "finish_reason"], registry=r)
        r.register(EngineCollector(engine_ref))

    def render(self) -> bytes:
        return generate_latest(self.registry)
