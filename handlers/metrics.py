"""Prometheus metrics for one application, in its own registry.

prometheus-client's default registry is a module global; each app gets its
own so that two relays in one process count separately. Relayed events are
counted in a plain dictionary, read only when metrics are scraped, to keep the
hot path free of locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Metrics", "render_processes"]

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
        # Events relayed, by type: the generations add to it directly.
        self.event_counts: dict[str, int] = {}
        registry.register(_EventCounts(self.event_counts))
        self.tokens = Counter(
            "thinkstream_tokens",
            "Tokens the provider reported, by kind and provider.",
            ["kind", "provider"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "thinkstream_upstream_errors",
            "Provider failures, by HTTP status ('none' when there was no status) and provider.",
            ["status", "provider"],
            registry=registry,
        )
        self.resumes = Counter("thinkstream_resumes", "Connections that resumed a stream.", registry=registry)
        self.upstream_retries = Counter(
            "thinkstream_upstream_retries",
            "Provider requests tried again before any answer came, by reason (HTTP status, or 'unreachable')"
            " and provider.",
            ["reason", "provider"],
            registry=registry,
        )
        self.rejections = Counter(
            "thinkstream_rejections", "Requests refused before streaming, by reason.", ["reason"], registry=registry
        )

    def count_retry(self, provider: str, reason: str) -> None:
        self.upstream_retries.labels(reason, provider).inc()

    def count_event(self, kind: str) -> None:
        counts = self.event_counts
        counts[kind] = counts.get(kind, 0) + 1

    def stream_ended(
        self,
        outcome: str,
        ttft: float | None,
        duration: float,
        usage: Mapping[str, int] | None,
        upstream: bool,
        status: int | None,
        provider: str,
    ) -> None:
        """Record a finished stream; ``upstream`` tells whether ``provider`` caused its failure.

        The provider label tells apart the providers of one relay: whose key
        the tokens were billed to, which one is failing.
        """
        self.streams.labels(outcome).inc()
        self.duration.observe(duration)
        if ttft is not None:
            self.ttft.observe(ttft)
        if usage:
            for kind in ("prompt_tokens", "completion_tokens", "reasoning_tokens"):
                if kind in usage:
                    self.tokens.labels(kind.removesuffix("_tokens"), provider).inc(usage[kind])
        if upstream:
            self.upstream_errors.labels(str(status) if status is not None else "none", provider).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> bytes:
        """This process's samples as JSON, for :func:`render_processes` in whichever process is scraped."""
        return orjson.dumps(
            [
                [m.name, m.documentation, m.type, [[s.name, s.labels, s.value] for s in m.samples]]
                for m in self.registry.collect()
            ]
        )


def render_processes(snapshots: Mapping[str, bytes]) -> bytes:
    """Several processes' metrics in one exposition, each sample labelled with its ``process``.

    With several relay processes behind one address (gunicorn's workers, or
    hosts behind a balancer) a scrape reaches one of them; it answers for
    all, from the snapshots they share through Redis. Sum over ``process``
    in queries (``sum by (outcome) (rate(thinkstream_streams_total[5m]))``).
    """
    merged: dict[str, Metric] = {}
    for process, data in sorted(snapshots.items()):
        for name, documentation, kind, samples in orjson.loads(data):
            metric = merged.get(name)
            if metric is None:
                metric = merged[name] = Metric(name, documentation, kind)
            for sample, labels, value in samples:
                metric.add_sample(sample, {**labels, "process": process}, value)
    return generate_latest(_Fixed(list(merged.values())))


class _Fixed(Collector):
    """Metric families made beforehand."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


class _EventCounts(Collector):
    """``thinkstream_events_total{type=…}``, read from the plain counts at scrape time."""

    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("thinkstream_events", "Events relayed, by type.", labels=["type"])
        for kind, n in sorted(self._counts.items()):
            family.add_metric([kind], n)
        yield family
