"""Realistic Kubernetes objects for the operator's tests, as plain dicts (valid per the schemas)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

OPERATOR_NAMESPACE = "meshaccel-system"


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
        },
    }


def node(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
    }


def pod(
    name: str,
    namespace: str,
    *,
    node: str | None = "node-1",
    ip: str | None = "10.1.0.10",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    sidecar: bool = True,
    phase: str = "Running",
    uid: str | None = None,
    host_network: bool = False,
    ips: Sequence[str] = (),
) -> dict[str, Any]:
    """A pod; ``ips`` is its status.podIPs (``ip``, status.podIP, first) when it has more."""
    containers: list[dict[str, Any]] = [{"name": "app", "image": "registry.example/app:1.0"}]
    if sidecar:
        containers.append({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.24.0"})
    spec: dict[str, Any] = {"containers": containers}
    if node is not None:
        spec["nodeName"] = node
    if host_network:
        spec["hostNetwork"] = True
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": address} for address in ips or (ip,)]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "labels": labels or {"app": name},
            "annotations": annotations or {},
        },
        "spec": spec,
        "status": status,
    }


def agent_pod(
    acceleration: str,
    node: str,
    ip: str,
    *,
    uid: str | None = None,
    phase: str = "Running",
    namespace: str = OPERATOR_NAMESPACE,
) -> dict[str, Any]:
    """An agent pod as the DaemonSet controller would make it (no controller runs in tests)."""
    obj = pod(
        f"meshaccel-agent-{acceleration}-{node}",
        namespace,
        node=node,
        ip=ip,
        uid=uid,
        phase=phase,
        sidecar=False,
        host_network=True,
        labels={
            "app.kubernetes.io/name": "meshaccel",
            "app.kubernetes.io/component": "agent",
            "meshaccel.io/acceleration": acceleration,
        },
    )
    obj["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "name": f"meshaccel-agent-{acceleration}",
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, acceleration)),
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return obj


def acceleration(name: str = "default", spec: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "meshaccel.io/v1alpha1",
        "kind": "MeshAcceleration",
        "metadata": {"name": name},
        "spec": spec
        if spec is not None
        else {"namespaceSelector": {"matchLabels": {"meshaccel.io/accelerate": "enabled"}}},
    }
