"""Prometheus metrics of the operator's push channel (:mod:`.pusher`).

Registry: :class:`PushMetrics` registers its families in the :class:`CollectorRegistry` it is
given, so that tests (and several operators in one process) never collide. The operator's own
process uses :func:`default_metrics`: one shared instance in :data:`REGISTRY`, a registry of
this module (not prometheus_client's global one), made on first use rather than at import.
Serve it with ``prometheus_client.start_http_server(port, registry=REGISTRY)`` or
``generate_latest(REGISTRY)``.

Labels: ``acceleration`` (the MeshAcceleration's name) on every push family; ``node`` only on the
per-node generation gauge (bounded by the cluster's size); ``reason`` from a small fixed
vocabulary (:data:`FAILURE_REASONS`, plus ``http_<status>``). A pusher removes its series when
it is closed, so a deleted MeshAcceleration leaves nothing behind. :class:`ResourceMetrics`
mirrors each resource's status (label ``resource``, its name, and the status's reasons); the
handlers update it with every status they write and remove it with the resource.

The process itself: :data:`REGISTRY` also holds ``process_*`` (memory, CPU, open files),
``python_info`` and ``meshaccel_build_info{component="operator",version,python}``, the same
families the agents export, so one dashboard reads both.

Everything here is updated from the event loop's thread; prometheus_client's metric objects
are thread-safe, so a scrape from the exposition thread is fine.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshaccel.contract.version import VERSION

# From a round trip on an idle cluster (~1 ms) to a big set on a busy node (seconds).
PUSH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# From a change to its confirmation: the batching window (100 ms) plus a round trip, and up to
# the retries of an agent that was away.
CHANGE_APPLIED_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Push failure reasons besides ``http_<status>`` (a 5xx, 507, or a refusing 4xx).
FAILURE_REASONS = (
    "connect",  # refused, reset, unreachable: the agent is not there (yet), or refused us
    "tls",  # the agent's certificate was refused: not of our CA, or not for the agents' name
    "timeout",  # no reply within request_timeout
    "stale_generation",  # a 409 naming a higher applied generation: sent again, higher
    "superseded",  # a 409 (or a probe) naming a higher epoch: another replica writes
    "bad_reply",  # a 2xx whose body is not the contract's reply
)


class BuildInfoCollector(Collector):
    """``meshaccel_build_info``: always 1, its labels say which build runs (as the agent's)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        build = GaugeMetricFamily(
            "meshaccel_build_info",
            "The running build: always 1, its labels say which",
            labels=["component", "version", "python"],
        )
        build.add_metric(["operator", VERSION, platform.python_version()], 1)
        yield build


def process_registry() -> CollectorRegistry:
    """A registry holding the process's own metrics and the build info."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(BuildInfoCollector())
    return registry


#: The default registry of the operator process (see the module docstring).
REGISTRY = process_registry()


class PushMetrics:
    """The push channel's metric families, in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.push_duration = Histogram(
            "meshaccel_operator_push_duration_seconds",
            "Round trip of each PUT /v1/pods that got a reply (any status)",
            ["acceleration"],
            buckets=PUSH_DURATION_BUCKETS,
            registry=registry,
        )
        self.change_applied = Histogram(
            "meshaccel_operator_change_applied_seconds",
            "From a node's set changing to its agent confirming a set that includes the change",
            ["acceleration"],
            buckets=CHANGE_APPLIED_BUCKETS,
            registry=registry,
        )
        self.push_failures = Counter(
            "meshaccel_operator_push_failures",
            "PUT /v1/pods attempts that did not apply, by reason (connect, tls, timeout, "
            "stale_generation, superseded, bad_reply, http_<status>)",
            ["acceleration", "reason"],
            registry=registry,
        )
        self.probe_failures = Counter(
            "meshaccel_operator_probe_failures",
            "GET /v1/health probes of agents that failed",
            ["acceleration"],
            registry=registry,
        )
        self.nodes_behind = Gauge(
            "meshaccel_operator_nodes_behind",
            "Nodes whose agent has not confirmed the newest set (no agent endpoint included)",
            ["acceleration"],
            registry=registry,
        )
        self.applied_generation = Gauge(
            "meshaccel_operator_applied_generation",
            "The generation each node's agent confirmed last",
            ["acceleration", "node"],
            registry=registry,
        )

        # (acceleration, reason) pairs counted, so that forget() can remove exactly those.
        self._failure_labels: set[tuple[str, str]] = set()

    def count_failure(self, acceleration: str, reason: str) -> None:
        self._failure_labels.add((acceleration, reason))
        self.push_failures.labels(acceleration, reason).inc()

    def forget_node(self, acceleration: str, node: str) -> None:
        with contextlib.suppress(KeyError):
            self.applied_generation.remove(acceleration, node)

    def forget(self, acceleration: str, nodes: list[str]) -> None:
        """Remove the acceleration's series (it was deleted or its pusher closed)."""
        for node in nodes:
            self.forget_node(acceleration, node)
        for family in (self.push_duration, self.change_applied, self.probe_failures):
            with contextlib.suppress(KeyError):
                family.remove(acceleration)
        with contextlib.suppress(KeyError):
            self.nodes_behind.remove(acceleration)
        for labels in [pair for pair in self._failure_labels if pair[0] == acceleration]:
            self._failure_labels.discard(labels)
            with contextlib.suppress(KeyError):
                self.push_failures.remove(*labels)


class ResourceMetrics:
    """Each MeshAcceleration's status as gauges, labelled ``acceleration`` (its name, like the
    push metrics): whether it is Ready, its pods selected and accelerated, and those not
    accelerated by the status's reasons. A reason once seen stays at 0 when no pod has it any
    more (series do not come and go); :meth:`forget` removes every series of a resource that
    went."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ready = Gauge(
            "meshaccel_operator_resource_ready",
            "1 while the MeshAcceleration's Ready condition is True, else 0",
            ["acceleration"],
            registry=registry,
        )
        self.pods_selected = Gauge(
            "meshaccel_operator_pods_selected",
            "Pods the MeshAcceleration selects and sends to its agents (status.podsSelected)",
            ["acceleration"],
            registry=registry,
        )
        self.pods_accelerated = Gauge(
            "meshaccel_operator_pods_accelerated",
            "Pods its agents report as programmed (status.podsAccelerated)",
            ["acceleration"],
            registry=registry,
        )
        self.pods_not_accelerated = Gauge(
            "meshaccel_operator_pods_not_accelerated",
            "Pods its selectors match that are not accelerated, by reason "
            "(status.podsNotAccelerated)",
            ["acceleration", "reason"],
            registry=registry,
        )
        self._reasons: dict[str, set[str]] = {}  # resource -> reasons with a series

    def publish(
        self,
        resource: str,
        *,
        ready: bool,
        selected: int,
        accelerated: int,
        not_accelerated: Mapping[str, int],
    ) -> None:
        self.ready.labels(resource).set(1 if ready else 0)
        self.pods_selected.labels(resource).set(selected)
        self.pods_accelerated.labels(resource).set(accelerated)
        reasons = self._reasons.setdefault(resource, set())
        reasons.update(not_accelerated)
        for reason in reasons:
            self.pods_not_accelerated.labels(resource, reason).set(not_accelerated.get(reason, 0))

    def forget(self, resource: str) -> None:
        for family in (self.ready, self.pods_selected, self.pods_accelerated):
            with contextlib.suppress(KeyError):
                family.remove(resource)
        for reason in self._reasons.pop(resource, ()):
            with contextlib.suppress(KeyError):
                self.pods_not_accelerated.remove(resource, reason)


@functools.cache
def default_metrics() -> PushMetrics:
    """The process's one :class:`PushMetrics`, in :data:`REGISTRY`."""
    return PushMetrics(REGISTRY)


@functools.cache
def resource_metrics() -> ResourceMetrics:
    """The process's one :class:`ResourceMetrics`, in :data:`REGISTRY`."""
    return ResourceMetrics(REGISTRY)
