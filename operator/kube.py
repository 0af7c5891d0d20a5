"""The operator's writes to the Kubernetes API: the agents' objects, kept as rendered.

Requests go through the official client's asyncio flavour (``kubernetes.aio``: its
configuration, authentication and TLS) and stay plain dicts: the operator renders dicts, and
10,000 pods never pass through here anyway (Kopf watches them).

Objects are kept in step by server-side apply, as the field manager ``meshaccel-operator``:
the operator sends every field it renders and only those; the API server records them as the
operator's (``metadata.managedFields``) and removes the ones it rendered last time and not
any more. Fields other managers set (``kubectl rollout restart``, an admission controller's
annotation) stay theirs and stay put; ``force=true`` only takes back fields the operator
renders. An apply that changes nothing writes nothing, so its resourceVersion tells.

Releases before server-side apply merge-patched the objects and kept the rendered object,
the agents' token included, in a ``meshaccel.io/last-applied`` annotation: the next apply
first removes it and makes the fields it lists the operator's (:func:`legacy_migration`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from kubernetes.aio import client as k8s
from kubernetes.aio import config as k8s_config

log = logging.getLogger("meshaccel.operator.kube")

FIELD_MANAGER: Final = "meshaccel-operator"
APPLY_PATCH: Final = "application/apply-patch+yaml"
JSON_PATCH: Final = "application/json-patch+json"
# What releases before server-side apply left on every object they wrote (see the docstring).
LEGACY_ANNOTATION: Final = "meshaccel.io/last-applied"
# Their writes named no fieldManager: the API server named them after the client's User-Agent
# ("OpenAPI-Generator/<version>/python") up to its first "/".
LEGACY_MANAGER: Final = "OpenAPI-Generator"

Object = dict[str, Any]


async def api_client() -> k8s.ApiClient:
    """A client for the API server: in-cluster credentials, else the kubeconfig."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        await k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return k8s.ApiClient(configuration)


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
    "Lease": ("/apis/coordination.k8s.io/v1", "leases"),
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


# --- taking over from releases before server-side apply ------------------------------------------


def legacy_migration(live: Mapping[str, Any]) -> list[Object]:
    """A JSON patch for an object an earlier release wrote, or ``[]`` if none did.

    It removes the ``last-applied`` annotation, and hands the fields that annotation lists
    from :data:`LEGACY_MANAGER` to the operator's apply entry in ``managedFields`` (as
    ``kubectl apply --server-side`` does when it takes over from client-side apply): the
    next apply then removes the fields the earlier release rendered and this one does not.
    Fields :data:`LEGACY_MANAGER` owns that the annotation does not list stay its own. The
    patch first tests the resourceVersion: a concurrent write makes it fail (422, nothing
    changed), and the next apply tries again.
    """
    meta = live.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    if LEGACY_ANNOTATION not in annotations:
        return []
    try:
        last = json.loads(annotations[LEGACY_ANNOTATION])
    except ValueError:
        last = {}  # unreadable: the annotation still goes, no field changes hands
    escaped = LEGACY_ANNOTATION.replace("~", "~0").replace("/", "~1")  # RFC 6901
    ops: list[Object] = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")},
        {"op": "remove", "path": f"/metadata/annotations/{escaped}"},
    ]
    managed = list(meta.get("managedFields") or [])
    handed = _hand_over(managed, last, str(live.get("apiVersion", "")))
    if handed != managed:
        ops.append({"op": "replace", "path": "/metadata/managedFields", "value": handed})
    return ops


def _hand_over(managed: list[Object], last: Any, api_version: str) -> list[Object]:
    """``managedFields`` with the fields in ``last`` moved from the legacy manager to ours."""
    kept: list[Object] = []
    taken: Object = {}
    time: Any = None
    for entry in managed:
        fields = entry.get("fieldsV1") or {}
        legacy = (
            entry.get("manager") == LEGACY_MANAGER
            and entry.get("operation") == "Update"
            and not entry.get("subresource")
        )
        ours = _within(fields, last) if legacy else {}
        if not ours:
            kept.append(entry)
            continue
        _union(taken, ours)
        time = entry.get("time", time)
        rest = _without(fields, ours)
        if rest:
            kept.append({**entry, "fieldsV1": rest})
    if not taken:
        return managed
    for index, entry in enumerate(kept):
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply":
            fields = copy.deepcopy(entry.get("fieldsV1") or {})
            _union(fields, taken)
            kept[index] = {**entry, "fieldsV1": fields}
            return kept
    entry = {"manager": FIELD_MANAGER, "operation": "Apply", "apiVersion": api_version}
    if time is not None:
        entry["time"] = time
    kept.append({**entry, "fieldsType": "FieldsV1", "fieldsV1": taken})
    return kept


def _step(value: Any, element: str) -> tuple[bool, Any]:
    """Follow one fieldsV1 element (``f:name``, ``k:{...}``, ``v:...``, ``i:n``) into ``value``."""
    kind, _, text = element.partition(":")
    if kind == "f":
        found = isinstance(value, Mapping) and text in value
        return found, value[text] if found else None
    if not isinstance(value, list):
        return False, None
    try:
        wanted = json.loads(text)
    except ValueError:
        return False, None
    for index, item in enumerate(value):
        if (
            (
                kind == "k"
                and isinstance(item, Mapping)
                and isinstance(wanted, Mapping)
                and all(item.get(key) == key_value for key, key_value in wanted.items())
            )
            or (kind == "v" and item == wanted)
            or (kind == "i" and index == wanted)
        ):
            return True, item
    return False, None


def _within(fields: Mapping[str, Any], value: Any) -> Object:
    """The part of a fieldsV1 tree that names fields ``value`` has."""
    kept: Object = {}
    for element, inner in fields.items():
        if element == ".":  # the node itself, which ``value`` is
            kept["."] = {}
            continue
        found, child = _step(value, element)
        if not found:
            continue
        if not inner:
            kept[element] = {}
        elif below := _within(inner, child):
            kept[element] = below
    return kept


def _without(fields: Mapping[str, Any], taken: Mapping[str, Any]) -> Object:
    """A fieldsV1 tree minus the fields of another."""
    rest: Object = {}
    for element, inner in fields.items():
        if element not in taken:
            rest[element] = inner
        elif inner and (below := _without(inner, taken[element])):
            rest[element] = below
    return rest


def _union(into: Object, more: Mapping[str, Any]) -> None:
    for element, inner in more.items():
        if element in into:
            _union(into[element], inner)
        else:
            into[element] = copy.deepcopy(inner)


# --- the client ---------------------------------------------------------------------------------


class Kube:
    """The few calls the operator makes, on namespaced objects of :data:`_KINDS`."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self._client = api_client

    async def request(
        self,
        method: str,
        kind: str,
        namespace: str,
        name: str | None = None,
        body: Any = None,
        content_type: str = "application/json",
        query: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, Object]:
        """One request: its HTTP status and body (``{}`` for a 404 on a read or a delete);
        :class:`KubeError` for any other status of 400 or more."""
        prefix, plural = _KINDS[kind]
        path = f"{prefix}/namespaces/{{namespace}}/{plural}" + ("/{name}" if name else "")
        params = await self._client.param_serialize(
            method=method,
            resource_path=path,
            path_params={"namespace": namespace, **({"name": name} if name else {})},
            query_params=list(query) or None,
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await self._client.call_api(*params)
        data = await response.read()  # type: ignore[no-untyped-call]
        if response.status == 404 and method in ("GET", "DELETE"):
            return response.status, {}
        text = data.decode(errors="replace")
        if response.status >= 400:
            raise KubeError(method, kind, name or "", response.status, text)
        parsed = json.loads(data) if data else {}
        if not isinstance(parsed, dict):
            raise KubeError(method, kind, name or "", response.status, f"not an object: {text}")
        return response.status, parsed

    async def read(self, kind: str, namespace: str, name: str) -> Object | None:
        status, found = await self.request("GET", kind, namespace, name)
        return None if status == 404 else found

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        status, _ = await self.request("DELETE", kind, namespace, name)
        return status != 404

    async def apply(self, obj: Object) -> tuple[str, Object]:
        """Server-side apply ``obj`` as :data:`FIELD_MANAGER`, creating it if it is missing.

        Returns what was done (created, updated, unchanged) and the object as stored:
        unchanged when the resourceVersion did not move.
        """
        meta = obj["metadata"]
        kind, namespace, name = obj["kind"], meta["namespace"], meta["name"]
        live = await self.read(kind, namespace, name)
        if live is not None and (migration := legacy_migration(live)):
            log.info("%s %s/%s: dropping the last-applied annotation", kind, namespace, name)
            await self.request(
                "PATCH",
                kind,
                namespace,
                name,
                migration,
                JSON_PATCH,
                query=(("fieldManager", FIELD_MANAGER),),
            )
        status, stored = await self.request(
            "PATCH",
            kind,
            namespace,
            name,
            obj,
            APPLY_PATCH,
            query=(("fieldManager", FIELD_MANAGER), ("force", "true")),
        )
        if status == 201:
            return "created", stored
        before = (live or {}).get("metadata", {}).get("resourceVersion")
        after = stored.get("metadata", {}).get("resourceVersion")
        return ("unchanged" if before is not None and before == after else "updated"), stored
