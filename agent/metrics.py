"""Prometheus metrics of the agent, in a registry of its own (nothing global, nothing at import).

Everything but the apply-duration histogram is read at scrape time by :class:`AgentCollector`:
the eBPF event counters from the datapath's per-CPU array, the rest from the reconciler's
:class:`~meshaccel.agent.reconcile.Snapshot`. Rendering reads a BPF map, so it blocks: call
:meth:`AgentMetrics.render` from a worker thread, not on the event loop.

Labels carry no pod names, uids or addresses: only aggregate numbers leave through /metrics.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from meshaccel.agent.layout import FALLBACK_REASONS, Counter
from meshaccel.agent.reconcile import Reconciler
from meshaccel.contract.version import VERSION

log = logging.getLogger(__name__)

# From well under a one-pod change (~1 ms) to far above a thousand-pod set (~100 ms).
APPLY_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class AgentCollector(Collector):
    """Scrape-time metrics: datapath counters and the reconciler's state."""

    def __init__(self, reconciler: Reconciler, attached: Callable[[], bool]) -> None:
        self._reconciler = reconciler
        self._attached = attached

    def collect(self) -> Iterator[Metric]:
        snapshot = self._reconciler.snapshot

        info = GaugeMetricFamily(
            "meshaccel_agent_info",
            "The agent process; boot_id changes on every start",
            labels=["boot_id"],
        )
        info.add_metric([snapshot.boot_id], 1)
        yield info

        build = GaugeMetricFamily(
            "meshaccel_build_info",
            "The running build: always 1, its labels say which",
            labels=["component", "version", "python"],
        )
        build.add_metric(["agent", VERSION, platform.python_version()], 1)
        yield build

        attached = GaugeMetricFamily(
            "meshaccel_datapath_attached", "1 when every program's pin is present, else 0"
        )
        attached.add_metric([], 1 if self._attached() else 0)
        yield attached

        try:
            counters = self._reconciler.datapath.counters()
        except Exception:  # a closed or unloaded datapath: leave the family out
            log.warning("datapath counters unreadable", exc_info=True, extra={"event": "metrics"})
        else:
            events = CounterMetricFamily(
                "meshaccel_datapath_events",
                "Datapath events by kind, summed over CPUs (bpf/include/meshaccel.h enum counter)",
                labels=["event"],
            )
            for counter in Counter:
                events.add_metric([counter.metric_name], counters.get(counter, 0))
            yield events
            fallbacks = CounterMetricFamily(
                "meshaccel_datapath_fallbacks",
                "Directions of connections that went from sk_msg back to TCP for good, by reason",
                labels=["reason"],
            )
            for counter, reason in FALLBACK_REASONS.items():
                fallbacks.add_metric([reason], counters.get(counter, 0))
            yield fallbacks

        yield GaugeMetricFamily(
            "meshaccel_agent_pods_accelerated",
            "Pods in the datapath's maps",
            value=snapshot.programmed,
        )
        yield GaugeMetricFamily(
            "meshaccel_agent_pods_unresolved",
            "Pods of the applied set whose cgroup was not found (not accelerated)",
            value=len(snapshot.unresolved),
        )
        if snapshot.applied_generation is not None:
            yield GaugeMetricFamily(
                "meshaccel_agent_applied_generation",
                "Generation of the pod set applied last (absent before the first)",
                value=snapshot.applied_generation,
            )
            yield GaugeMetricFamily(
                "meshaccel_agent_applied_epoch",
                "Epoch (the operator's term) of the pod set applied last (absent before the "
                "first; 0 from an operator that predates epochs)",
                value=snapshot.applied_epoch,
            )
        if snapshot.last_apply_time is not None:
            yield GaugeMetricFamily(
                "meshaccel_agent_last_apply_timestamp_seconds",
                "Unix time of the last successful PUT /v1/pods, idempotent repeats included",
                value=snapshot.last_apply_time.timestamp(),
            )
        errors = CounterMetricFamily(
            "meshaccel_agent_apply_errors",
            "Pod sets refused or failed, by reason (nothing was changed unless "
            "reason=rollback_failed)",
            labels=["reason"],
        )
        for reason, count in sorted(snapshot.apply_errors.items()):
            errors.add_metric([reason], count)
        yield errors
        yield CounterMetricFamily(
            "meshaccel_agent_pods_vanished",
            "Programmed pods removed because their cgroup was gone (deleted while no new set "
            "said so)",
            value=snapshot.pods_vanished,
        )

        entries = GaugeMetricFamily(
            "meshaccel_agent_map_entries", "Entries the agent programmed per map", labels=["map"]
        )
        capacity = GaugeMetricFamily(
            "meshaccel_agent_map_capacity", "max_entries of each per-pod map", labels=["map"]
        )
        for name, count in snapshot.map_entries.items():
            entries.add_metric([name], count)
            capacity.add_metric([name], snapshot.map_capacity.get(name, 0))
        yield entries
        yield capacity


class AgentMetrics:
    """The agent's registry: the scrape-time collector plus the apply-duration histogram."""

    def __init__(self, reconciler: Reconciler, *, attached: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(reconciler, attached))
        self.apply_duration = Histogram(
            "meshaccel_agent_apply_duration_seconds",
            "Time the reconciler took for each successful apply (map writes included)",
            buckets=APPLY_DURATION_BUCKETS,
            registry=self.registry,
        )

    def observe_apply(self, seconds: float) -> None:
        self.apply_duration.observe(seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header: (body, content type). Blocks (map reads)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
