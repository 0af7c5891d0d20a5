"""Prometheus metrics of the agent, in a registry of its own (nothing global, nothing at import).

Everything but the apply-duration histogram is read at scrape time by :class:`AgentCollector`:
the datapath's per-CPU counters, split into families by meaning and unit
(:data:`DATAPATH_FAMILIES`: every counter in exactly one), the rest from the reconciler's
:class:`~meshaccel.agent.reconcile.Snapshot`; the process's own (``process_*``, ``python_info``)
come from prometheus_client's collectors. Rendering reads a BPF map, so it blocks: call
:meth:`AgentMetrics.render` from a worker thread, not on the event loop.

Labels carry no pod names, uids or addresses: only aggregate numbers leave through /metrics.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
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


@dataclass(frozen=True)
class CounterFamily:
    """A Prometheus counter family fed by datapath counters: one series per counter.

    ``members`` maps each counter to its series' ``label`` value; a family without a label has
    one member. ``name`` is the family's name without ``_total`` (the exposition appends it).
    """

    name: str
    documentation: str
    label: str | None
    members: Mapping[Counter, str]

    def metric(self, counters: Mapping[Counter, int]) -> CounterMetricFamily:
        labels = [self.label] if self.label else []
        family = CounterMetricFamily(self.name, self.documentation, labels=labels)
        for counter, value in self.members.items():
            family.add_metric([value] if self.label else [], counters.get(counter, 0))
        return family


#: The datapath's counters as Prometheus families: each kernel counter (bpf/include/meshaccel.h
#: ``enum counter``) feeds exactly one series (tests/unit/test_metric_families.py). The label
#: values are the contract of dashboards and alerts: never rename one, add instead.
DATAPATH_FAMILIES: tuple[CounterFamily, ...] = (
    CounterFamily(
        "meshaccel_datapath_connections_steered",
        "Connections meshaccel took over at connect(), by hop: app_to_sidecar (an app's connect "
        "rewritten to its sidecar), sidecar_to_sidecar (a sidecar's to a same-node pod's inbound "
        "listener), sidecar_to_app (a sidecar's to its own pod's app: left as is, recorded)",
        "hop",
        {
            Counter.COUNTER_CONNECT_OUTBOUND_REDIRECTED: "app_to_sidecar",
            Counter.COUNTER_CONNECT_INBOUND_REDIRECTED: "sidecar_to_sidecar",
            Counter.COUNTER_CONNECT_SIDECAR_TO_OWN_POD: "sidecar_to_app",
        },
    ),
    CounterFamily(
        "meshaccel_datapath_connections_bypassed",
        "Connects from accelerated pods deliberately left to the mesh's iptables path, by reason",
        "reason",
        {
            Counter.COUNTER_BYPASS_LOCAL_DESTINATION: "local_destination",
            Counter.COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED: "outbound_port_excluded",
            Counter.COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED: "outbound_cidr_excluded",
            Counter.COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION: "sidecar_remote_destination",
            Counter.COUNTER_BYPASS_INBOUND_PORT_EXCLUDED: "inbound_port_excluded",
            Counter.COUNTER_BYPASS_SAME_NODE_INBOUND_DISABLED: "same_node_inbound_disabled",
            Counter.COUNTER_BYPASS_NO_INBOUND_LISTENER: "no_inbound_listener",
            Counter.COUNTER_BYPASS_FAMILY_NOT_IN_POD: "family_not_in_pod",
        },
    ),
    CounterFamily(
        "meshaccel_datapath_transparency_answers",
        "Calls answered as under iptables for steered connections, by call: so_original_dst "
        "(getsockopt SO_ORIGINAL_DST), getpeername (also accept's peer), getsockname, recvmsg "
        "(a DNS reply's source)",
        "call",
        {
            Counter.COUNTER_ORIGINAL_DST_ANSWERED: "so_original_dst",
            Counter.COUNTER_PEER_ADDRESS_RESTORED: "getpeername",
            Counter.COUNTER_LOCAL_ADDRESS_RESTORED: "getsockname",
            Counter.COUNTER_DNS_REPLY_ADDRESS_RESTORED: "recvmsg",
        },
    ),
    CounterFamily(
        "meshaccel_datapath_dns_captured",
        "Application DNS (port 53) sent to the proxy's DNS server in pods whose mesh captures "
        "DNS, by call: connect (a UDP or TCP socket's connect) or sendmsg (an unconnected UDP "
        "datagram)",
        "call",
        {
            Counter.COUNTER_DNS_CONNECT_CAPTURED: "connect",
            Counter.COUNTER_DNS_DATAGRAM_CAPTURED: "sendmsg",
        },
    ),
    CounterFamily(
        "meshaccel_datapath_app_hops_on_tcp",
        "Application hops (an app's connection to its sidecar, or its sidecar's to it) left to "
        "TCP from the start because most of the pod's recent application connections sent once: "
        "joining a sockhash would cost more than it saves",
        None,
        {Counter.COUNTER_APP_HOP_ON_TCP: ""},
    ),
    CounterFamily(
        "meshaccel_datapath_sockets_joined",
        "Sockets that joined a sockhash (sk_msg may deliver between them)",
        None,
        {Counter.COUNTER_SOCKHASH_ADDED: ""},
    ),
    CounterFamily(
        "meshaccel_datapath_sockhash_key_collisions",
        "Sockets that did not join a sockhash because a live socket holds their key (their "
        "bytes take TCP)",
        None,
        {Counter.COUNTER_SOCKHASH_KEY_TAKEN: ""},
    ),
    CounterFamily(
        "meshaccel_datapath_messages",
        "Messages sk_msg handled, by verdict: redirected (into the peer socket) or passed (to "
        "TCP: the peer is no redirect target here, or the agent is unloading)",
        "verdict",
        {Counter.COUNTER_MSG_REDIRECTED: "redirected", Counter.COUNTER_MSG_PASSED: "passed"},
    ),
    CounterFamily(
        "meshaccel_datapath_redirected_bytes",
        "Bytes sk_msg delivered socket to socket, skipping the TCP/IP stack",
        None,
        {Counter.COUNTER_MSG_BYTES_REDIRECTED: ""},
    ),
    CounterFamily(
        "meshaccel_datapath_fallbacks",
        "Directions of connections that sk_msg leaves to TCP for good, by reason: budget, "
        "receiver_unknown, redirect_failed, draining (it was redirecting), peer_not_target "
        "(its first message found no redirect target)",
        "reason",
        {**FALLBACK_REASONS, Counter.COUNTER_MSG_PEER_NOT_TARGET: "peer_not_target"},
    ),
    CounterFamily(
        "meshaccel_datapath_senders_left",
        "Fallen-back senders that left msg_senders: their sends take the plain TCP path again",
        None,
        {Counter.COUNTER_SENDER_LEFT: ""},
    ),
    CounterFamily(
        "meshaccel_datapath_errors",
        "Datapath failures, by kind (each leaves its connection to TCP or iptables; should "
        "stay 0): map_update, sockhash_update, socket_state, receive_buffer",
        "kind",
        {
            Counter.COUNTER_ERROR_MAP_UPDATE: "map_update",
            Counter.COUNTER_ERROR_SOCKHASH_UPDATE: "sockhash_update",
            Counter.COUNTER_ERROR_SOCKET_STATE: "socket_state",
            Counter.COUNTER_ERROR_RECEIVE_BUFFER: "receive_buffer",
        },
    ),
)


def datapath_metrics(counters: Mapping[Counter, int]) -> Iterator[CounterMetricFamily]:
    """The families of :data:`DATAPATH_FAMILIES` with the values of ``counters``."""
    for family in DATAPATH_FAMILIES:
        yield family.metric(counters)


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
            use = self._reconciler.datapath.app_connections()
        except Exception:  # a closed or unloaded datapath: leave the families out
            log.warning("datapath maps unreadable", exc_info=True, extra={"event": "metrics"})
        else:
            yield from datapath_metrics(counters)
            yield GaugeMetricFamily(
                "meshaccel_datapath_short_lived_pod_addresses",
                "Pod addresses whose application connections count as short-lived now: their "
                "application hops stay on TCP, but for probes",
                value=sum(1 for record in use.values() if record.short_lived),
            )

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
    """The agent's registry: the scrape-time collector, the apply-duration histogram and the
    process's own metrics (``process_*``: memory, CPU, open files; ``python_info``)."""

    def __init__(self, reconciler: Reconciler, *, attached: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(reconciler, attached))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
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
