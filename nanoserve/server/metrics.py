"""Prometheus metrics of one server, in their own registry (no process-wide globals, so tests can build many).

Two sources: the engine thread's latest :class:`EngineSnapshot` (gauges and totals, read at scrape time) and
the engine thread's per-event callbacks (histograms: time to first token, inter-token latency, sequences per
step). prometheus-client metrics are thread-safe, so the callbacks record straight from the engine thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nanoserve.engine.async_engine import EngineSnapshot

PREFIX = "nanoserve"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class _SnapshotCollector(Collector):
    """Gauges and totals straight from the newest engine snapshot, so they are never stale or double-counted."""

    def __init__(
        self, snapshot: Callable[[], EngineSnapshot], healthy: Callable[[], bool], in_flight: Callable[[], int]
    ) -> None:
        self._snapshot = snapshot
        self._healthy = healthy
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield gauge("engine_healthy", "1 while the engine thread serves requests, 0 after it failed or stopped",
                    1.0 if self._healthy() else 0.0)  # fmt: skip
        yield gauge("num_requests_running", "requests with a sequence in the running batch", s.num_running_requests)
        yield gauge("num_requests_waiting", "requests waiting to be scheduled", s.num_waiting_requests)
        yield gauge("num_requests_in_flight", "requests accepted by the server and not yet answered", self._in_flight())
        yield gauge("num_seqs_running", "sequences in the running batch", s.num_running_seqs)
        yield gauge("kv_cache_usage_ratio", "fraction of KV-cache blocks held by sequences (0..1)", s.kv_cache_usage)
        yield gauge("kv_blocks_free", "KV-cache blocks not held by any sequence (prefix-cached ones included)",
                    s.num_free_blocks)  # fmt: skip
        yield gauge("kv_blocks_total", "KV-cache blocks in all", s.num_total_blocks)
        hit_rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        yield gauge(
            "prefix_cache_hit_rate", "prompt tokens found in the prefix cache / prompt tokens looked up", hit_rate
        )
        yield counter(
            "prefix_cache_queries_tokens", "prompt tokens looked up in the prefix cache", s.prefix_cache_queries
        )
        yield counter("prefix_cache_hits_tokens", "prompt tokens found in the prefix cache", s.prefix_cache_hits)
        yield counter("prompt_tokens", "prompt tokens of admitted requests", s.prompt_tokens)
        yield counter("generation_tokens", "tokens generated", s.generation_tokens)
        yield counter("engine_steps", "engine steps run", s.num_steps)
        yield gauge("max_seqs_in_step", "the most sequences run together in one step so far (> 1: batching)",
                    s.max_seqs_in_step)  # fmt: skip
        yield counter(
            "num_preemptions", "sequences preempted (KV blocks reclaimed, recomputed later)", s.num_preemptions
        )
        yield counter("requests_aborted", "requests aborted before they finished (client gone, shutdown)",
                      s.num_aborted_requests)  # fmt: skip


class ServerMetrics:
    """The server's registry; also the :class:`~nanoserve.engine.async_engine.EngineObserver` of its engine."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "time from arrival to the first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "time between successive outputs of a request",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "time from arrival to the last token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.seqs_per_step = Histogram(
            f"{PREFIX}_seqs_per_step", "sequences run together in one engine step (the batch size)",
            buckets=_BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.requests_finished = Counter(
            f"{PREFIX}_requests_finished", "requests that ended, by finish reason (stop | length | abort)",
            ["finished_reason"], registry=self.registry,
        )  # fmt: skip

    def attach(
        self, snapshot: Callable[[], EngineSnapshot], healthy: Callable[[], bool], in_flight: Callable[[], int]
    ) -> None:
        """Export the engine's state; called once the engine exists."""
        self.registry.register(_SnapshotCollector(snapshot, healthy, in_flight))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- EngineObserver (called on the engine thread) ------------------------------------------------
    def on_step(self, num_seqs: int, snapshot: EngineSnapshot) -> None:
        if num_seqs:
            self.seqs_per_step.observe(num_seqs)

    def on_first_token(self, seconds_since_arrival: float) -> None:
        self.time_to_first_token.observe(seconds_since_arrival)

    def on_token_interval(self, seconds: float) -> None:
        self.inter_token_latency.observe(seconds)

    def on_request_finished(self, reason: str, e2e_seconds: float) -> None:
        self.requests_finished.labels(finished_reason=reason).inc()
        self.e2e_latency.observe(e2e_seconds)
