"""How much of a node's datapath maps each accelerated pod takes, and which pods of a set fit.

Each agent sizes its per-pod maps from ``spec.datapath`` (``maxPods``, ``maxPodPorts``,
``maxPodCidrs``, as :class:`~meshaccel.contract.settings.Capacities` says) and refuses a set that
does not fit, whole. The operator never sends one: it
counts each pod's entries as the agent does (:func:`usage`, the mesh's own ports included) and
gives every pod a budget (:class:`Budget`), so that the users of a selected namespace cannot
take a node's acceleration away from other pods:

* a pod's **share** of a map is the map's capacity divided by ``maxPods``: pods within their
  share of every map always fit together, up to ``maxPods`` of them, whatever others ask for;
* a pod may take more, up to its **limit** (what every pod of the resource needs, the mesh's own
  ports and ``spec.exclusions``, plus :data:`SHARES_PER_POD` shares), from the room the pods
  within their share leave, oldest pods first;
* a pod over its limit, or that does not fit in what is left, is left out of its node's set
  (the mesh's iptables path keeps serving it) with a reason; the rest of the set goes out.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from meshaccel.contract.api import PodOptions, PodSpec
from meshaccel.contract.modes import MESH_MODES, MeshModeName
from meshaccel.contract.settings import Capacities
from meshaccel.operator.models import MeshAccelerationSpec

# The agent's per-pod maps an option fills, in the order of a usage tuple (agent/reconcile.py
# counts the same: tests/operator/test_budget.py keeps the two in step).
# pod_ips holds a pod's addresses: one per family (a dual-stack pod takes two).
MAPS = ("pod_ports", "outbound_excluded_cidrs", "outbound_included_cidrs", "pod_ips")
# How many shares a pod may take, beyond what every pod of the resource needs.
SHARES_PER_POD = 8

Usage = tuple[int, int, int, int]  # entries in each of MAPS
_OptionsUsage = tuple[int, int, int]  # the first three: what the options take


@functools.lru_cache(maxsize=4096)
def _usage(mode: MeshModeName, options: PodOptions) -> _OptionsUsage:
    mesh = MESH_MODES[mode]
    return (
        len(mesh.outbound_excluded_ports | options.excluded_outbound_ports)
        + len(mesh.inbound_excluded_ports | options.excluded_inbound_ports),
        len(options.excluded_outbound_cidrs),
        len(options.included_outbound_cidrs or ()),
    )


def usage(pod: PodSpec) -> Usage:
    """The entries ``pod`` takes in each of :data:`MAPS` (besides one in ``pods``). Pods share
    their options objects (:mod:`.selection`): counted once each."""
    return (*_usage(pod.mode, pod.options), len(pod.ips) or 1)  # ips: empty, or every address


@dataclass(frozen=True, slots=True)
class LeftOut:
    """A pod of a node's set that the node's maps do not take (reason ``OverBudget``)."""

    pod: str  # namespace/name
    node: str
    reason: str


@dataclass(frozen=True)
class Budget:
    """A resource's budgets on each of its nodes (every agent has the same maps)."""

    max_pods: int
    capacity: Usage
    share: Usage
    limit: Usage

    @classmethod
    def of(cls, spec: MeshAccelerationSpec) -> Budget:
        datapath, exclusions = spec.datapath, spec.exclusions
        sizes = Capacities(
            pods=datapath.maxPods, pod_ports=datapath.maxPodPorts, pod_cidrs=datapath.maxPodCidrs
        ).max_entries()
        capacity: Usage = (
            sizes["pod_ports"],
            sizes["outbound_excluded_cidrs"],
            sizes["outbound_included_cidrs"],
            sizes["pod_ips"],
        )
        share: Usage = (
            capacity[0] // datapath.maxPods,
            capacity[1] // datapath.maxPods,
            capacity[2] // datapath.maxPods,
            capacity[3] // datapath.maxPods,
        )
        base = (
            *_usage(
                spec.mode,
                PodOptions(
                    excluded_outbound_ports=frozenset(exclusions.outboundPorts),
                    excluded_inbound_ports=frozenset(exclusions.inboundPorts),
                    excluded_outbound_cidrs=frozenset(
                        ipaddress.ip_network(cidr, strict=False)
                        for cidr in exclusions.outboundCIDRs
                    ),
                ),
            ),
            1,  # an address
        )
        limit: Usage = (
            min(capacity[0], base[0] + SHARES_PER_POD * share[0]),
            min(capacity[1], base[1] + SHARES_PER_POD * share[1]),
            min(capacity[2], base[2] + SHARES_PER_POD * share[2]),
            min(capacity[3], base[3] + SHARES_PER_POD * share[3]),
        )
        return cls(datapath.maxPods, capacity, share, limit)

    def fit(self, node: str, pods: Sequence[PodSpec]) -> tuple[list[PodSpec], dict[str, LeftOut]]:
        """The pods of ``node``'s set that go to its agent, and by uid those left out.

        ``pods`` come in the order they are served (the picture gives the oldest first): the
        pods within their share first (they always fit, up to ``max_pods``), then the others.
        """
        left_out: dict[str, LeftOut] = {}
        within: list[tuple[PodSpec, Usage]] = []
        beyond: list[tuple[PodSpec, Usage]] = []
        for pod in pods:
            need = usage(pod)
            over = [
                f"{name} needs {n}, a pod may take {most}"
                for name, n, most in zip(MAPS, need, self.limit, strict=True)
                if n > most
            ]
            if over:
                left_out[pod.uid] = _left_out(pod, node, "; ".join(over))
            elif all(n <= s for n, s in zip(need, self.share, strict=True)):
                within.append((pod, need))
            else:
                beyond.append((pod, need))
        room = list(self.capacity)
        taken: list[PodSpec] = []
        for pod, need in (*within, *beyond):
            if len(taken) >= self.max_pods:
                reason = f"the node's agent holds {self.max_pods} pods (spec.datapath.maxPods)"
                left_out[pod.uid] = _left_out(pod, node, reason)
                continue
            short = [
                f"{name} needs {n}, {r} left on the node"
                for name, n, r in zip(MAPS, need, room, strict=True)
                if n > r
            ]
            if short:
                left_out[pod.uid] = _left_out(pod, node, "; ".join(short))
                continue
            room = [r - n for r, n in zip(room, need, strict=True)]
            taken.append(pod)
        return taken, left_out


def _left_out(pod: PodSpec, node: str, reason: str) -> LeftOut:
    return LeftOut(f"{pod.namespace}/{pod.name}", node, reason)
