"""Fixtures for operator tests against the API emulator (see ``emulator.py`` for its limits).

* ``emulator``: a running :class:`ApiServerEmulator` on 127.0.0.1 (random port, ``.url``), with
  every CRD in the repository's ``crds/`` folder loaded. Assert on ``emulator.rejections``
  (refused invalid writes), ``emulator.live(...)``/``emulator.find(...)``/``events_for(...)``.
* ``kubeconfig``: a kubeconfig file pointing at the emulator, made the default for Kopf's login
  and for ``kubernetes.aio.config.load_kube_config()``.
* ``kube``: a small typed client (:class:`KubeClient`) with helpers that create realistic
  namespaces, nodes and pods (valid per kubernetes-validate).
* :func:`kopf_running`: runs a Kopf operator (``KopfRunner``) while the test keeps the event
  loop, so the emulator keeps serving; stops it without blocking the loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import pathlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import kmock
import pytest
import yaml

from meshaccel.operator.credentials import AgentTLS
from tests.operator.emulator import ApiServerEmulator, JsonObj

REPO = pathlib.Path(__file__).resolve().parents[2]
CRDS = REPO / "crds"
TOKEN = "emulator-token"
ISTIO_PROXY_IMAGE = "docker.io/istio/proxyv2:1.22.3"


@pytest.fixture
async def emulator() -> AsyncIterator[ApiServerEmulator]:
    emu = ApiServerEmulator()
    if CRDS.is_dir():
        emu.load_crds(CRDS)
    async with emu, kmock.Server(emu):
        yield emu


@pytest.fixture
def kubeconfig(
    emulator: ApiServerEmulator, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> pathlib.Path:
    path = tmp_path / "kubeconfig"
    server = str(emulator.url).rstrip("/")
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "tester", "user": {"token": TOKEN}}],
                "contexts": [
                    {
                        "name": "emulator",
                        "context": {
                            "cluster": "emulator",
                            "user": "tester",
                            "namespace": "default",
                        },
                    }
                ],
                "current-context": "emulator",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # no in-cluster login
    # Both kubeconfig loaders read $KUBECONFIG once, at import: point their copies here too.
    import kubernetes.aio.config.kube_config as aio_kube_config
    import kubernetes.config.kube_config as sync_kube_config

    monkeypatch.setattr(sync_kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(aio_kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    return path


def api_path(
    api_version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    parts = [prefix]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if subresource:
        parts.append(subresource)
    return "/".join(parts)


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class KubeClient:
    """Just enough of a Kubernetes client for test setup and raw API assertions."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.base_url + path,
            json=body,
            params=params,
            headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"},
        ) as response:
            payload = await response.json(content_type=None) if response.content_length else None
            return response.status, payload

    async def _ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> JsonObj:
        status, payload = await self.request(method, path, body, **kwargs)
        if status >= 300:
            raise ApiError(status, payload)
        assert isinstance(payload, dict)
        return payload

    async def create(self, path: str, body: JsonObj) -> JsonObj:
        return await self._ok("POST", path, body)

    async def get(self, path: str, **params: str) -> JsonObj:
        return await self._ok("GET", path, params=params or None)

    async def merge(self, path: str, patch: JsonObj) -> JsonObj:
        return await self._ok("PATCH", path, patch, content_type="application/merge-patch+json")

    async def json_patch(self, path: str, ops: Sequence[JsonObj]) -> JsonObj:
        return await self._ok("PATCH", path, list(ops), content_type="application/json-patch+json")

    async def replace(self, path: str, body: JsonObj) -> JsonObj:
        return await self._ok("PUT", path, body)

    async def delete(self, path: str, options: JsonObj | None = None) -> JsonObj:
        return await self._ok("DELETE", path, options)

    async def create_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> JsonObj:
        return await self.create(
            api_path("v1", "namespaces"),
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": name,
                    "labels": {"kubernetes.io/metadata.name": name, **(labels or {})},
                },
            },
        )

    async def create_node(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        ready: bool = True,
        address: str = "198.18.0.1",
    ) -> JsonObj:
        await self.create(
            api_path("v1", "nodes"),
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        **(labels or {}),
                    },
                },
                "spec": {"podCIDR": "10.244.0.0/24"},
            },
        )
        # As a kubelet does: the status goes through the status subresource.
        return await self.merge(
            api_path("v1", "nodes", name=name, subresource="status"),
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True" if ready else "False",
                            "reason": "KubeletReady",
                            "message": "kubelet is posting",
                            "lastHeartbeatTime": "2025-01-01T00:00:00Z",
                            "lastTransitionTime": "2025-01-01T00:00:00Z",
                        }
                    ],
                    "addresses": [
                        {"type": "InternalIP", "address": address},
                        {"type": "Hostname", "address": name},
                    ],
                },
            },
        )

    async def create_pod(
        self,
        namespace: str,
        name: str,
        *,
        node: str | None = "node-1",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        sidecar: bool = True,
        phase: str = "Running",
        pod_ip: str = "198.18.1.10",
        pod_ips: Sequence[str] = (),
    ) -> JsonObj:
        """A pod; ``pod_ips`` is its status.podIPs (``pod_ip`` first) when it has more."""
        containers: list[JsonObj] = [
            {
                "name": "app",
                "image": "docker.io/library/nginx:1.27",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            }
        ]
        if sidecar:
            containers.append(
                {
                    "name": "istio-proxy",
                    "image": ISTIO_PROXY_IMAGE,
                    "args": ["proxy", "sidecar"],
                    "ports": [
                        {"containerPort": 15090, "name": "http-envoy-prom", "protocol": "TCP"}
                    ],
                    "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
                }
            )
        spec: JsonObj = {"containers": containers, "restartPolicy": "Always"}
        if node:
            spec["nodeName"] = node
        pod_annotations = dict(annotations or {})
        if sidecar:
            pod_annotations.setdefault("sidecar.istio.io/status", '{"containers":["istio-proxy"]}')
        await self.create(
            api_path("v1", "pods", namespace),
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": dict(labels or {}),
                    "annotations": pod_annotations,
                },
                "spec": spec,
            },
        )
        status: JsonObj = {"phase": phase}
        if phase == "Running":
            status |= {
                "podIP": pod_ip,
                "podIPs": [{"ip": ip} for ip in pod_ips or (pod_ip,)],
                "hostIP": "198.18.0.1",
                "startTime": "2025-01-01T00:00:00Z",
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        return await self.merge(
            api_path("v1", "pods", namespace, name, "status"), {"status": status}
        )


@pytest.fixture
async def kube(emulator: ApiServerEmulator) -> AsyncIterator[KubeClient]:
    async with aiohttp.ClientSession() as session:
        yield KubeClient(session, str(emulator.url))


@contextlib.asynccontextmanager
async def kopf_running(
    *args: str, registry: Any, settings: Any = None, timeout: float = 15, standalone: bool = True
) -> AsyncIterator[Any]:
    """``KopfRunner`` as an async context: its blocking exit runs in a thread, so the
    emulator (on this loop) keeps serving while the operator shuts down."""
    from kopf.testing import KopfRunner

    mode = ["--standalone"] if standalone else []
    runner = KopfRunner(
        ["run", *mode, *args], registry=registry, settings=settings, timeout=timeout
    )
    runner.__enter__()
    try:
        yield runner
    except BaseException as e:
        await asyncio.to_thread(runner.__exit__, type(e), e, e.__traceback__)
        raise
    else:
        await asyncio.to_thread(runner.__exit__, None, None, None)


# --- the DaemonSet controller and kubelet, played by the tests (the emulator runs neither) ---


async def agent_tls(kube: KubeClient, namespace: str, acceleration: str) -> AgentTLS:
    """What kubelet would mount for ``acceleration``'s agents: their Secret, as the operator
    wrote it (server certificate, key, the CA bundle the operator's certificate chains to)."""
    from meshaccel.operator.credentials import TLS_CA, TLS_CERT, TLS_KEY
    from meshaccel.operator.rendering import secret_name  # (imports the models: late)

    secret = await kube.get(api_path("v1", "secrets", namespace, secret_name(acceleration)))
    cert, key, bundle = (
        base64.b64decode(secret["data"][k]).decode() for k in (TLS_CERT, TLS_KEY, TLS_CA)
    )
    return AgentTLS(cert, key, bundle)


async def run_agent_pod(kube: KubeClient, daemonset: JsonObj, node: str, ip: str) -> None:
    """The DaemonSet's pod on ``node``, as its controller makes it, then Running at ``ip``
    (host network: the pod's IP is the node's)."""
    meta = daemonset["metadata"]
    template = daemonset["spec"]["template"]
    name = f"{meta['name']}-{node}"
    owner = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    await kube.create(
        api_path("v1", "pods", meta["namespace"]),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": meta["namespace"],
                "labels": template["metadata"]["labels"],
                "ownerReferences": [owner],
            },
            "spec": {**template["spec"], "nodeName": node},
        },
    )
    await kube.merge(
        api_path("v1", "pods", meta["namespace"], name, "status"),
        {
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip},
        },
    )


async def report_rollout(kube: KubeClient, daemonset: JsonObj, nodes: int) -> None:
    """The DaemonSet's status once ``nodes`` agents run the current template and are ready."""
    meta = daemonset["metadata"]
    await kube.merge(
        api_path("apps/v1", "daemonsets", meta["namespace"], meta["name"], "status"),
        {
            "status": {
                "currentNumberScheduled": nodes,
                "desiredNumberScheduled": nodes,
                "numberMisscheduled": 0,
                "numberReady": nodes,
                "updatedNumberScheduled": nodes,
                "observedGeneration": meta.get("generation", 1),
            },
        },
    )
