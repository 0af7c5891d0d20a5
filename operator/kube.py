"""The operator's writes to the Kubernetes API: the agents' objects, kept as rendered.

Requests go through the official client's asyncio flavour (``kubernetes.aio``: its
configuration, authentication and TLS) and stay plain dicts: the operator renders dicts and
compares dicts, and 10,000 pods never pass through here anyway (Kopf watches them).

Objects are kept in step like ``kubectl apply``: the last rendered object is remembered in an
annotation, and a JSON merge patch sets every rendered field and removes (``null``) the
fields rendered last time and not any more. A live object that already contains everything
rendered is left alone, so the periodic re-check costs one GET per object.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from kubernetes.aio import client as k8s

log = logging.getLogger("meshaccel.operator.kube")

LAST_APPLIED: Final = "meshaccel.io/last-applied"
MERGE_PATCH: Final = "application/merge-patch+json"

Object = dict[str, Any]


class KubeError(Exception):
    def __init__(self, action: str, kind: str, name: str, status: int, body: str) -> None:
        detail = body
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(body).get("message", body)
        super().__init__(f"{action} {kind} {name}: HTTP {status}: {detail}")
        self.status = status


# Where each kind the operator writes lives: (API prefix, plural). Requests go through the
# official client's ApiClient (configuration, authentication, TLS, retries) but not through
# its generated per-group classes, whose ~1,000 model classes cost ~30 MB of resident memory.
_KINDS: Final[dict[str, tuple[str, str]]] = {
    "ServiceAccount": ("/api/v1", "serviceaccounts"),
    "Secret": ("/api/v1", "secrets"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "DaemonSet": ("/apis/apps/v1", "daemonsets"),
}


def removals(old: Any, new: Any) -> Any:
    """A merge patch from ``old`` to ``new`` (RFC 7386): ``new`` plus ``null`` for dropped keys."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return new
    patch: dict[str, Any] = {}
    for key, value in new.items():
        patch[key] = removals(old.get(key), value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch


def contains(live: Any, wanted: Any) -> bool:
    """Whether ``live`` already holds everything in ``wanted`` (server defaults aside)."""
    if isinstance(wanted, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and contains(live[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(contains(a, b) for a, b in zip(live, wanted, strict=True))
        )
    return bool(live == wanted)


class Kube:
    """The few calls the operator makes, on namespaced objects of :data:`_KINDS`."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._client = api_client

    async def _call(
        self,
        method: str,
        kind: str,
        namespace: str,
        name: str | None = None,
        body: Object | None = None,
        content_type: str = "application/json",
    ) -> Object | None:
        """One request; ``None`` for a 404 on a read or a delete."""
        prefix, plural = _KINDS[kind]
        path = f"{prefix}/namespaces/{{namespace}}/{plural}" + ("/{name}" if name else "")
        params = await self._client.param_serialize(
            method=method,
            resource_path=path,
            path_params={"namespace": namespace, **({"name": name} if name else {})},
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await self._client.call_api(*params)
        data = await response.read()  # type: ignore[no-untyped-call]
        what = name or (body or {}).get("metadata", {}).get("name", "")
        if response.status == 404 and method in ("GET", "DELETE"):
            return None
        if response.status >= 400:
            raise KubeError(method, kind, what, response.status, data.decode(errors="replace"))
        parsed: Object = json.loads(data) if data else {}
        return parsed

    async def read(self, kind: str, namespace: str, name: str) -> Object | None:
        return await self._call("GET", kind, namespace, name)

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        return await self._call("DELETE", kind, namespace, name) is not None

    async def create(self, obj: Object) -> Object:
        created = await self._call("POST", obj["kind"], obj["metadata"]["namespace"], body=obj)
        assert created is not None
        return created

    async def patch(self, kind: str, namespace: str, name: str, patch: Object) -> Object:
        patched = await self._call("PATCH", kind, namespace, name, patch, MERGE_PATCH)
        assert patched is not None
        return patched

    async def apply(self, obj: Object) -> tuple[str, Object]:
        """Create ``obj`` or bring the live object in step.

        Returns what was done (created, updated, unchanged) and the object as stored.
        """
        meta = obj["metadata"]
        kind, namespace, name = obj["kind"], meta["namespace"], meta["name"]
        rendered = json.dumps(obj, sort_keys=True, separators=(",", ":"))
        wanted = {
            **obj,
            "metadata": {
                **meta,
                "annotations": {**meta.get("annotations", {}), LAST_APPLIED: rendered},
            },
        }
        live = await self.read(kind, namespace, name)
        if live is None:
            return "created", await self.create(wanted)
        if contains(live, wanted):
            return "unchanged", live
        last_text = (live.get("metadata", {}).get("annotations") or {}).get(LAST_APPLIED)
        last = json.loads(last_text) if last_text else {}
        return "updated", await self.patch(kind, namespace, name, removals(last, wanted))
