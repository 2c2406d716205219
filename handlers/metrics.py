"""Prometheus metrics for one application, in its own registry.

prometheus-client's default registry is a module global; each app gets its
own so that two relays in one process count separately. Counting is done per
batch of events, not per event, to keep the hot path light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The relay's counters, gauges and histograms."""

    def __init__(self, active_streams: Callable[[], int], active_readers: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        Gauge("thinkstream_active_streams", "Generations running now.", registry=registry).set_function(active_streams)
        Gauge("thinkstream_active_readers", "Connections following a stream now.", registry=registry).set_function(
            active_readers
        )
        self.streams = Counter(
            "thinkstream_streams", "Streams ended, by outcome (done or an error code).", ["outcome"], registry=registry
        )
        self.ttft = Histogram(
            "thinkstream_time_to_first_token_seconds",
            "From accepting a stream to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "thinkstream_stream_duration_seconds",
            "From accepting a stream to its last event.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.events = Counter("thinkstream_events", "Events relayed, by type.", ["type"], registry=registry)
        # labels() looks its child up under a lock: once per event type, not once per batch.
        self._event_counters: dict[str, Counter] = {}
        self.tokens = Counter(
            "thinkstream_tokens", "Tokens the provider reported, by kind.", ["kind"], registry=registry
        )
        self.upstream_errors = Counter(
            "thinkstream_upstream_errors",
            "Provider failures, by HTTP status ('none' when there was no status).",
            ["status"],
            registry=registry,
        )
        self.resumes = Counter("thinkstream_resumes", "Connections that resumed a stream.", registry=registry)
        self.rejections = Counter(
            "thinkstream_rejections", "Requests refused before streaming, by reason.", ["reason"], registry=registry
        )

    def count_events(self, counts: Mapping[str, int]) -> None:
        for kind, n in counts.items():
            counter = self._event_counters.get(kind)
            if counter is None:
                counter = self._event_counters[kind] = self.events.labels(kind)
            counter.inc(n)

    def stream_ended(
        self,
        outcome: str,
        ttft: float | None,
        duration: float,
        usage: Mapping[str, int] | None,
        upstream: bool,
        status: int | None,
    ) -> None:
        """Record a finished stream; ``upstream`` tells whether the provider caused its failure."""
        self.streams.labels(outcome).inc()
        self.duration.observe(duration)
        if ttft is not None:
            self.ttft.observe(ttft)
        if usage:
            for kind in ("prompt_tokens", "completion_tokens", "reasoning_tokens"):
                if kind in usage:
                    self.tokens.labels(kind.removesuffix("_tokens")).inc(usage[kind])
        if upstream:
            self.upstream_errors.labels(str(status) if status is not None else "none").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
