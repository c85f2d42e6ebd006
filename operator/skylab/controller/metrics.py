"""Prometheus metrics of the operator: what it manages, how long trials take, what fails."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Trials run for minutes to hours.
DURATION_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._phases: dict[tuple[str, str, str], str] = {}  # (kind, namespace, name)
        self._lock = threading.Lock()
        self.trial_duration = Histogram(
            "skylab_trial_duration_seconds",
            "Wall-clock seconds from a trial's creation to its outcome, by outcome",
            ["status"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.handler_errors = Counter(
            "skylab_handler_errors",
            "Exceptions raised by operator handlers (kopf retries them)",
            ["handler"],
            registry=self.registry,
        )
        self.registry.register(_PhaseCollector(self))

    def set_phase(self, kind: str, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phases[(kind, namespace, name)] = phase

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((kind, namespace, name), None)

    def phase_counts(self, kind: str) -> Tally[str]:
        with self._lock:
            return Tally(phase for (k, _, _), phase in self._phases.items() if k == kind)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PhaseCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for kind, plural in (("Campaign", "campaigns"), ("Trial", "trials")):
            family = GaugeMetricFamily(
                f"skylab_{plural}", f"{kind}s known to the operator, by phase", labels=["phase"]
            )
            for phase, count in sorted(self.metrics.phase_counts(kind).items()):
                family.add_metric([phase], count)
            yield family
