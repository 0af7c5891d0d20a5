"""A Kubernetes API emulator good enough to run a real Kopf operator against: kmock's
``KubernetesEmulator`` with the gaps that matter to meshaccel closed.

What it adds to kmock 0.8 (each has its own test in ``test_emulator.py``):

* metadata: ``uid``, ``resourceVersion`` (one global counter, bumped by every write),
  ``generation`` (bumped when anything outside ``metadata``/``status`` changes, and when a
  deletion starts), ``creationTimestamp``, ``generateName``; no-op writes change nothing;
* PATCH: merge patch with RFC 7386 null deletion, JSON patch (RFC 6902, ``test`` ops honoured),
  strategic merge patch treated as a plain merge patch (lists are replaced, never merged by key);
  PUT honours ``resourceVersion`` (409 on mismatch), so does a patch that carries one;
* status subresource separation for kinds that have one (``status`` on create is dropped);
* field ownership: ``metadata.managedFields`` recorded on every write, and server-side apply
  (``application/apply-patch+yaml`` with a required ``fieldManager``: creates a missing
  object, removes what its manager stopped applying unless another owns it, 409 on another
  manager's field unless ``force=true``): see ``fieldmanager.py``, tested in
  ``test_emulator_apply.py``;
* ``labelSelector`` (full syntax) and ``fieldSelector`` (the fields the real server supports for
  the kind; others are a 400 as on a real server) on list, watch and deletecollection;
  typed lists (``kind: PodList``, ``metadata.resourceVersion``); watches resume from a
  ``resourceVersion`` and, like a real server, send ADDED/DELETED when an object starts/stops
  matching the watch's selectors, and end after ``timeoutSeconds`` (each such end is recorded
  in ``watches_timed_out``);
* cluster-scoped resources, including ``GET /api/v1/namespaces``;
* discovery of exactly the resources meshaccel's operator and Kopf use (plus any CRD loaded);
* validation (kubernetes-validate, strict) and CRD defaulting+validation before every store,
  the CRD's CEL rules (``x-kubernetes-validations``) included (``crd_cel.py``): a refused write
  is a 422 ``Status`` (``reason: Invalid``, the rule's message for a CEL rule), leaves the
  object unchanged and is recorded in ``rejections``;
* ownerReference garbage collection (background, recursive), namespace deletion removes the
  namespace's content, ``propagationPolicy: Orphan`` strips the ownerReferences instead;
* finalizers: DELETE sets ``deletionTimestamp``; removing the last finalizer removes the object;
* ``pods/exec`` over the websocket channel protocol (``v4.channel.k8s.io``), what runs being the
  test's :meth:`ApiServerEmulator.on_exec` handler: see ``pod_exec.py``.

Deliberate differences from a real server (do not rely on them in integration tests):

* a failed JSON-patch ``test`` is a 422 (as kube-apiserver does, and as Kopf expects: it
  catches 422 there and retries on the next cycle), not a 409; it is recorded in ``conflicts``;
* builtin kinds get no server-side defaulting (a pod gets no ``restartPolicy``, no ``nodeName``
  is assigned, nothing is scheduled or run); ``status.phase`` starts as Pending for pods and
  Active for namespaces, nothing else fills ``status``;
* pods are removed at once on DELETE (no kubelet, no grace period);
* garbage collection and namespace cleanup run synchronously within the deleting request;
  ``Foreground`` propagation behaves as ``Background``;
* no admission (no webhooks, no quota, no RBAC: every token is accepted, no
  ValidatingAdmissionPolicies), no ratcheting of CRD rules (an unchanged invalid field is
  refused again), no ``format`` checks, no ``dryRun``, no ``limit``/``continue`` pagination,
  no BOOKMARKs;
* server-side apply to a subresource is a 415; the server's own writes (garbage collection
  removing an ownerReference, a deletion's timestamp) change no managedFields.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import pathlib
import random
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import yaml
from kmock import KubernetesEmulator, KubernetesError, ResourceInfo, resource
from kmock._internal import enums, rendering

from tests.operator.fieldmanager import ApplyConflict, FieldManager, kind_shape
from tests.operator.k8s_validation import BuiltinSchemas, CrdSchema, FieldError, check_metadata
from tests.operator.pod_exec import ExecHandler, ExecRequest, exec_target, serve_exec

JsonObj = dict[str, Any]
ObjKey = tuple[resource, str | None, str]

APPLY_PATCH = "application/apply-patch+yaml"
VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what the apiserver's generateName draws from


@dataclass(frozen=True)
class ResourceSpec:
    """What the emulator knows about one served resource (and tells Kopf in discovery)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool = False  # has a status subresource
    shortnames: tuple[str, ...] = ()
    field_labels: tuple[str, ...] = ()  # fieldSelector labels beyond metadata.name/namespace
    crd: CrdSchema | None = None
    initial_status: Mapping[str, Any] | None = None  # what the server sets on create

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def ref(self) -> resource:
        return resource(group=self.group, version=self.version, plural=self.plural)

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


_POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)
_EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)

BUILTIN_RESOURCES: tuple[ResourceSpec, ...] = (
    ResourceSpec(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        status=True,
        shortnames=("po",),
        field_labels=_POD_FIELDS,
        initial_status={"phase": "Pending"},
    ),
    ResourceSpec(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        status=True,
        shortnames=("ns",),
        field_labels=("status.phase",),
        initial_status={"phase": "Active"},
    ),
    ResourceSpec(
        "",
        "v1",
        "nodes",
        "Node",
        False,
        status=True,
        shortnames=("no",),
        field_labels=("spec.unschedulable",),
    ),
    ResourceSpec("", "v1", "secrets", "Secret", True, field_labels=("type",)),
    ResourceSpec("", "v1", "configmaps", "ConfigMap", True, shortnames=("cm",)),
    ResourceSpec("", "v1", "serviceaccounts", "ServiceAccount", True, shortnames=("sa",)),
    ResourceSpec("", "v1", "events", "Event", True, shortnames=("ev",), field_labels=_EVENT_FIELDS),
    ResourceSpec("apps", "v1", "daemonsets", "DaemonSet", True, status=True, shortnames=("ds",)),
    ResourceSpec(
        "apps", "v1", "deployments", "Deployment", True, status=True, shortnames=("deploy",)
    ),
    ResourceSpec(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        True,
        shortnames=("ev",),
        field_labels=(
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "reason",
            "reportingController",
            "type",
        ),
    ),
    # Kopf's own peering resources (no schema: Kopf writes free-form status into them).
    ResourceSpec("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", False),
    ResourceSpec("kopf.dev", "v1", "kopfpeerings", "KopfPeering", True),
)
# --- Leases (issue 12: the operator's writer Lease, operator/leadership.py) ----------------------
# Kept apart from the tuple above so that edits there and here do not collide.
LEASES = ResourceSpec("coordination.k8s.io", "v1", "leases", "Lease", True)
BUILTIN_RESOURCES = (*BUILTIN_RESOURCES, LEASES)
# --- end of Leases --------------------------------------------------------------------------------

# Kopf watches CRDs to notice resources that appear at run time; creating one here serves it.
CRDS = ResourceSpec(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    False,
    status=True,
    shortnames=("crd", "crds"),
)
# Served even before crds/meshaccel.io_meshaccelerations.yaml exists (then without a schema).
MESHACCELERATION = ResourceSpec(
    "meshaccel.io",
    "v1alpha1",
    "meshaccelerations",
    "MeshAcceleration",
    False,
    status=True,
    shortnames=("meshaccel", "ma"),
)


@dataclass(frozen=True)
class Rejection:
    """A write the emulator refused as invalid (tests assert there were none)."""

    verb: str
    resource: str
    namespace: str | None
    name: str | None
    field: str
    message: str


def api_error(code: int, reason: str, message: str, **details: Any) -> KubernetesError:
    return KubernetesError(status=code, reason=reason, message=message, details=details)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, ``null`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- selectors ---------------------------------------------------------------------------------

Predicate = Callable[[Mapping[str, Any]], bool]
_SET_REQ = re.compile(r"^\s*(!?)\s*([^\s=!<>()]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_CMP_REQ = re.compile(r"^\s*([^\s=!<>()]+)\s*(==|=|!=|<|>)\s*([^\s=!<>(),]*)\s*$")


def _split_terms(text: str) -> list[str]:
    # Commas separate requirements, except inside "in (a,b)".
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [term for term in terms if term.strip()]


def parse_label_selector(text: str) -> Predicate:
    """``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``, ``k>1``."""
    checks: list[Predicate] = []
    for term in _split_terms(text):
        if match := _CMP_REQ.match(term):
            key, op, value = match.groups()
            checks.append(_label_compare(key, op, value))
        elif (match := _SET_REQ.match(term)) and not (match[1] and match[3]):
            negated, key, op, values = match.groups()
            options = {v.strip() for v in (values or "").split(",") if v.strip()}
            checks.append(_label_set(key, op or ("!" if negated else ""), options))
        else:
            raise api_error(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(check(labels) for check in checks)


def _label_set(key: str, op: str, options: set[str]) -> Predicate:
    def check(labels: Mapping[str, Any]) -> bool:
        if op == "in":
            return labels.get(key) in options
        if op == "notin":
            return labels.get(key) not in options
        return (key in labels) != (op == "!")

    return check


def _label_compare(key: str, op: str, value: str) -> Predicate:
    if op in ("=", "=="):
        return lambda labels: labels.get(key) == value
    if op == "!=":
        return lambda labels: labels.get(key) != value
    try:
        bound = int(value)
    except ValueError:
        raise api_error(400, "BadRequest", f"{key}{op}{value}: not an integer") from None

    def compare(labels: Mapping[str, Any]) -> bool:
        try:
            actual = int(labels[key])
        except (KeyError, ValueError):
            return False
        return actual > bound if op == ">" else actual < bound

    return compare


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """A field as a field selector sees it: a string, "" when absent."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):  # e.g. the event's "source": its component
        value = value.get("component")
    return "" if value is None else str(value)


def _field_check(path: str, value: str, *, negate: bool) -> Predicate:
    return lambda obj: (field_value(obj, path) == value) != negate


def parse_field_selector(text: str, spec: ResourceSpec) -> Predicate:
    allowed = {"metadata.name", "metadata.namespace", *spec.field_labels}
    checks: list[Predicate] = []
    for term in _split_terms(text):
        match = re.match(r"^\s*([^\s=!]+)\s*(==|=|!=)\s*(\S*)\s*$", term)
        if not match:
            raise api_error(400, "BadRequest", f"invalid field selector: {term!r}")
        path, op, value = match.groups()
        if path not in allowed:
            raise api_error(400, "BadRequest", f'field label not supported: "{path}"')
        checks.append(_field_check(path, value, negate=op == "!="))
    return lambda obj: all(check(obj) for check in checks)


@dataclass
class Selection:
    """Which objects of a resource a list/watch/deletecollection request means."""

    namespace: str | None
    name: str | None
    labels: Predicate
    fields: Predicate

    def in_scope(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        return (self.namespace is None or meta.get("namespace") == self.namespace) and (
            self.name is None or meta.get("name") == self.name
        )

    def matches(self, obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return self.in_scope(obj) and self.labels(labels) and self.fields(obj)


@dataclass(eq=False)
class Watcher:
    spec: ResourceSpec
    selection: Selection
    queue: asyncio.Queue[JsonObj | None] = field(default_factory=asyncio.Queue)
    known: set[tuple[str | None, str]] = field(default_factory=set)
    timeout: float | None = None

    def translate(self, event: JsonObj) -> JsonObj | None:
        """A real server's view: objects entering/leaving the selection are ADDED/DELETED."""
        obj = event["object"]
        if not self.selection.in_scope(obj):
            return None
        key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        was_known = key in self.known
        if event["type"] == "DELETED":
            self.known.discard(key)
            return event if was_known else None
        if self.selection.matches(obj):
            self.known.add(key)
            return event if was_known else {"type": "ADDED", "object": obj}
        self.known.discard(key)
        return {"type": "DELETED", "object": obj} if was_known else None


def _content_type(request: rendering.Request) -> str:
    header = next(
        (v for k, v in request.headers.items() if k.lower() == "content-type"), "application/json"
    )
    return header.split(";")[0].strip()


# --- the emulator --------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class ApiServerEmulator(KubernetesEmulator):
    """kmock's emulator with uid/resourceVersion/generation, proper patching, selectors, status
    subresources, validation, garbage collection (see the module's docstring for the limits)."""

    k8s_version: str = "1.33"
    initial_namespaces: tuple[str, ...] = DEFAULT_NAMESPACES
    require_namespace: bool = True  # namespaced creates need an existing namespace (404 if not)
    # Forget each request once answered (kmock's request log then stays empty): for benchmarks.
    forget_requests: bool = False

    rejections: list[Rejection] = attrs.field(factory=list, init=False)
    _served: int = attrs.field(default=0, init=False)
    conflicts: list[str] = attrs.field(factory=list, init=False)
    # The timeoutSeconds of every watch the emulator ended because that time was up.
    watches_timed_out: list[float | None] = attrs.field(factory=list, init=False)
    specs: dict[tuple[str, str, str], ResourceSpec] = attrs.field(factory=dict, init=False)
    resource_version: int = attrs.field(default=0, init=False)
    _schemas: BuiltinSchemas = attrs.field(init=False)
    _history: list[tuple[int, ResourceSpec, JsonObj]] = attrs.field(factory=list, init=False)
    _watchers: set[Watcher] = attrs.field(factory=set, init=False)
    _results: dict[int, Any] = attrs.field(factory=dict, init=False)
    _orphaning: set[str] = attrs.field(factory=set, init=False)  # uids deleted with Orphan
    _field_managers: dict[tuple[str, str, str], FieldManager] = attrs.field(
        factory=dict, init=False
    )
    # pods/exec: what runs in which pod (on_exec), and every exec that reached a pod.
    _exec_handlers: dict[tuple[str, str], ExecHandler] = attrs.field(factory=dict, init=False)
    execs: list[ExecRequest] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._schemas = BuiltinSchemas(self.k8s_version)
        for spec in (*BUILTIN_RESOURCES, MESHACCELERATION, CRDS):
            self.add_resource(spec)
        ns_spec = self.specs["", "v1", "namespaces"]
        for name in self.initial_namespaces:
            self._create(ns_spec, None, {"metadata": {"name": name}}, verb="create")

    # --- declaring resources ---

    def add_resource(self, spec: ResourceSpec) -> None:
        self.specs[spec.group, spec.version, spec.plural] = spec
        self._field_managers.pop((spec.group, spec.version, spec.plural), None)
        self.resources[spec.ref] = ResourceInfo(
            namespaced=spec.namespaced,
            kind=spec.kind,
            singular=spec.singular,
            verbs=set(VERBS),
            shortnames=set(spec.shortnames),
            subresources={"status"} if spec.status else set(),
        )

    def add_crd(self, crd: Mapping[str, Any]) -> list[ResourceSpec]:
        """Serve the versions of an apiextensions.k8s.io/v1 CustomResourceDefinition (and keep
        the CRD object itself, which Kopf watches to notice resources appearing)."""
        crd_spec = self.specs[CRDS.group, CRDS.version, CRDS.plural]
        if self._find(crd_spec, None, crd["metadata"]["name"]) is None:
            self._create(crd_spec, None, crd, verb="create")  # registers it, see _create()
        return self._crd_resources(crd)

    @staticmethod
    def _crd_resources(crd: Mapping[str, Any]) -> list[ResourceSpec]:
        crd_spec = crd["spec"]
        names = crd_spec["names"]
        specs = []
        for version in crd_spec["versions"]:
            if not version.get("served", True):
                continue
            openapi = (version.get("schema") or {}).get("openAPIV3Schema")
            specs.append(
                ResourceSpec(
                    group=crd_spec["group"],
                    version=version["name"],
                    plural=names["plural"],
                    kind=names["kind"],
                    namespaced=crd_spec["scope"] == "Namespaced",
                    status="status" in (version.get("subresources") or {}),
                    shortnames=tuple(names.get("shortNames") or ()),
                    crd=CrdSchema(openapi) if openapi else None,
                )
            )
        return specs

    def load_crds(self, path: str | pathlib.Path) -> list[ResourceSpec]:
        """Load every CRD in a YAML file (or in every *.yaml of a folder)."""
        path = pathlib.Path(path)
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        added = []
        for file in files:
            for doc in yaml.safe_load_all(file.read_text(encoding="utf-8")):
                if isinstance(doc, Mapping) and doc.get("kind") == "CustomResourceDefinition":
                    added += self.add_crd(doc)
        return added

    def spec_for(self, ref: resource | str) -> ResourceSpec:
        ref = resource(ref) if isinstance(ref, str) else ref
        spec = self.specs.get((ref.group or "", ref.version or "", ref.plural or ""))
        if spec is None:
            raise api_error(
                404,
                "NotFound",
                f"the server could not find the requested resource "
                f"({ref.group}/{ref.version}/{ref.plural})",
            )
        return spec

    # --- reading the state (for tests) ---

    def live(self, ref: resource | str, namespace: str | None = None) -> list[JsonObj]:
        """The current objects of a resource (all namespaces unless one is given), sorted."""
        spec = self.spec_for(ref)
        objs = [obj for key, obj in self._live_items(spec) if namespace in (None, key[1])]
        return sorted(
            objs, key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"])
        )

    def find(self, ref: resource | str, namespace: str | None, name: str) -> JsonObj | None:
        """One current object (a copy), or None."""
        spec = self.spec_for(ref)
        found = self._find(spec, namespace, name)
        return None if found is None else copy.deepcopy(found)

    def events_for(self, name: str, namespace: str | None = None) -> list[JsonObj]:
        """Core v1 events whose involvedObject has this name (and namespace, if given)."""
        return [
            event
            for event in self.live("v1/events")
            if event.get("involvedObject", {}).get("name") == name
            and (namespace is None or event["involvedObject"].get("namespace") == namespace)
        ]

    # --- HTTP plumbing ---

    def on_exec(self, namespace: str, pod: str, handler: ExecHandler) -> None:
        """What runs when a client execs into ``namespace/pod`` (any container, any command:
        the handler gets them)."""
        self._exec_handlers[namespace, pod] = handler

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if (target := exec_target(raw_request.path)) is not None:
            pod = self._find(self.specs["", "v1", "pods"], *target)
            return await serve_exec(raw_request, pod, self._exec_handlers, self.execs.append)
        # kmock's own parser fails on /api/v1/namespaces and misreads /api/v1/namespaces/x,
        # so requests are parsed here; the rest follows kmock's RawHandler.__call__.
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        self._served += 1
        try:
            request = await self._parse_request(raw_request, self._served)
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as e:
                raw_response = e.args[0]
                raise (e.__cause__ or e) from None
            finally:
                if self.forget_requests:
                    # kmock finds a request's reaction by scanning every recorded request:
                    # quadratic over a benchmark's hundreds of thousands of requests.
                    self._requests.remove(request)
                    for payload in self._payloads:  # each reaction records what it served
                        payload._requests.clear()
        except Exception as e:
            if not self._errors:
                raise
            self._errors[-1].append(e)
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(e)
            await self._stream_error(e, raw_response)
            await raw_response.write_eof()
            return raw_response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for watcher in list(self._watchers):  # end the open watch streams first
            watcher.queue.put_nowait(None)
        await super().__aexit__(exc_type, exc_value, traceback)

    @staticmethod
    async def _parse_request(raw: aiohttp.web.BaseRequest, request_id: int) -> rendering.Request:
        body = await raw.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        parts = [part for part in raw.path.split("/") if part]
        group: str | None = None
        version: str | None = None
        rest: list[str] = []
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 2 and parts[0] == "apis":
            group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
        namespace = plural = name = subresource = None
        # /api/v1/namespaces/x/status is the namespace's subresource, /…/namespaces/x/pods is not.
        if (
            len(rest) >= 3
            and rest[0] == "namespaces"
            and rest[2:] not in (["status"], ["finalize"])
        ):
            namespace, rest = rest[1], rest[2:]
        if rest:
            plural = rest[0]
            name = rest[1] if len(rest) > 1 else None
            subresource = "/".join(rest[2:]) or None
        method = raw.method.upper()
        query = dict(raw.query)
        action: enums.action | None = None
        if group is not None and plural is not None:
            if method == "GET" and query.get("watch") in ("true", "1"):
                action = enums.action.WATCH
            elif method == "GET":
                action = enums.action.FETCH if name else enums.action.LIST
            elif method == "POST" and not name:
                action = enums.action.CREATE
            elif method in ("PATCH", "PUT") and name:
                action = enums.action.UPDATE
            elif method == "DELETE":
                action = enums.action.DELETE
        return rendering.Request(
            id=request_id,
            raw_request=raw,
            url=raw.url,
            method=method,
            params=query,
            headers=dict(raw.headers),
            cookies=dict(raw.cookies),
            body=body,
            text=body.decode("utf-8", errors="replace"),
            data=data,
            action=action,
            namespace=namespace,
            name=name,
            subresource=subresource,
            resource=None
            if group is None
            else resource(group=group, version=version, plural=plural),
        )

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.resource.plural is None or request.action is None:
            # Discovery, /version and non-Kubernetes URLs: kmock's scaffold serves them.
            return await super(KubernetesEmulator, self)._handle(request)
        try:
            # The state changes here, synchronously (so atomically on the event loop); the
            # response then goes through kmock's reactions, so tests can still intercept it.
            self._results[request.id] = self._dispatch(request)
        except KubernetesError as e:
            return await self._render_error(e)
        try:
            return await super(KubernetesEmulator, self)._handle(request)
        finally:
            result = self._results.pop(request.id, None)
            if isinstance(result, Watcher):
                self._watchers.discard(result)

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if not isinstance(exc, KubernetesError):
            return await super()._render_error(exc)
        return aiohttp.web.json_response(
            {
                "apiVersion": "v1",
                "kind": "Status",
                "metadata": {},
                "status": "Failure",
                "code": exc.status,
                "reason": exc.reason,
                "message": exc.message,
                "details": exc.details or {},
            },
            status=exc.status,
        )

    async def _serve_version(self, request: rendering.Request) -> rendering.Payload:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict) and str(payload.get("groupVersion")).startswith("/"):
            payload["groupVersion"] = payload["groupVersion"][1:]  # kmock says "/v1" for core
        return payload

    async def _serve_server_version(self, request: rendering.Request) -> rendering.Payload:
        major, minor = self._schemas.version.split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "gitVersion": f"v{major}.{minor}.0-emulated",
            "platform": "linux/amd64",
        }

    # kmock's fallback reactions call these; the work was done in _dispatch().
    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        return self._results.get(request.id)

    async def _serve_fetch(self, request: rendering.Request) -> rendering.Payload:
        return self._results.get(request.id)

    async def _serve_update(self, request: rendering.Request) -> rendering.Payload:
        # Always with a status: kmock keeps the last one on its reaction (an apply's 201).
        result = self._results.get(request.id)
        if isinstance(result, rendering.Response):
            return result
        return rendering.Response(status=200, payload=result)

    async def _serve_delete(self, request: rendering.Request) -> rendering.Payload:
        return self._results.get(request.id)

    async def _serve_create(self, request: rendering.Request) -> rendering.Payload:
        return rendering.Response(status=201, payload=self._results.get(request.id))

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[rendering.Payload]:
        yield b""  # send the headers now: a quiet watch is still a started watch
        watcher = self._results.get(request.id)
        if not isinstance(watcher, Watcher):
            return
        loop = asyncio.get_running_loop()
        deadline = None if watcher.timeout is None else loop.time() + watcher.timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                event = await asyncio.wait_for(watcher.queue.get(), remaining)
            except TimeoutError:
                # timeoutSeconds: the server ends the stream, the client re-watches
                self.watches_timed_out.append(watcher.timeout)
                return
            if event is None:
                return
            translated = watcher.translate(event)
            if translated is not None:
                yield translated

    # --- the API's semantics ---

    def _dispatch(self, request: rendering.Request) -> Any:
        assert request.resource is not None
        spec = self.spec_for(request.resource)
        namespace = request.namespace
        if not spec.namespaced and namespace is not None:
            raise api_error(404, "NotFound", f"{spec.group_resource} is not namespaced")
        if request.subresource not in (None, "status") or (
            request.subresource == "status" and not spec.status
        ):
            raise api_error(
                404, "NotFound", f"{spec.group_resource} has no subresource {request.subresource!r}"
            )
        method = request.method.value
        name = request.name
        if request.action == enums.action.WATCH:
            return self._start_watch(spec, request)
        if method == "GET" and name is None:
            return self._list(spec, self._selection(spec, request))
        if method == "GET" and name is not None:
            return self._get_or_404(spec, namespace, name)
        if method == "POST" and name is None:
            if spec.namespaced and namespace is None:
                raise api_error(405, "MethodNotAllowed", "create needs a namespace in the URL")
            manager = self._manager_name(request)
            return self._create(spec, namespace, request.data, verb="create", manager=manager)
        if method == "PATCH" and name is not None and _content_type(request) == APPLY_PATCH:
            return self._apply(spec, namespace, name, request)
        if method in ("PATCH", "PUT") and name is not None:
            return self._update(spec, namespace, name, request)
        if method == "DELETE" and name is not None:
            return self._delete(spec, namespace, name, request.data, request.params)
        if method == "DELETE":
            selection = self._selection(spec, request)
            victims = self._list(spec, selection)["items"]
            for obj in victims:
                meta = obj["metadata"]
                self._delete(spec, meta.get("namespace"), meta["name"], request.data, {})
            return self._list(spec, selection)
        raise api_error(405, "MethodNotAllowed", f"{method} is not supported here")

    def _selection(self, spec: ResourceSpec, request: rendering.Request) -> Selection:
        params = request.params
        return Selection(
            namespace=request.namespace,
            name=request.name,
            labels=parse_label_selector(params.get("labelSelector", "")),
            fields=parse_field_selector(params.get("fieldSelector", ""), spec),
        )

    def _live_items(self, spec: ResourceSpec) -> Iterable[tuple[ObjKey, JsonObj]]:
        ref = spec.ref
        for key, obj in self._objects.items():
            if key[0] == ref and not obj.deleted:
                yield key, obj.raw

    def _find(self, spec: ResourceSpec, namespace: str | None, name: str) -> JsonObj | None:
        key = (spec.ref, namespace if spec.namespaced else None, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return self._objects[key].raw

    def _get_or_404(self, spec: ResourceSpec, namespace: str | None, name: str) -> JsonObj:
        found = self._find(spec, namespace, name)
        if found is None:
            raise api_error(
                404,
                "NotFound",
                f'{spec.group_resource} "{name}" not found',
                name=name,
                group=spec.group,
                kind=spec.plural,
            )
        return found

    def _list(self, spec: ResourceSpec, selection: Selection) -> JsonObj:
        items = [obj for _, obj in self._live_items(spec) if selection.matches(obj)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return {
            "apiVersion": spec.api_version,
            "kind": f"{spec.kind}List",
            "metadata": {"resourceVersion": str(self.resource_version)},
            "items": items,
        }

    def _start_watch(self, spec: ResourceSpec, request: rendering.Request) -> Watcher:
        timeout = request.params.get("timeoutSeconds")
        watcher = Watcher(
            spec, self._selection(spec, request), timeout=float(timeout) if timeout else None
        )
        since = request.params.get("resourceVersion", "")
        if since in ("", "0"):
            # No starting point: the current state first, as synthetic ADDED events.
            for obj in self._list(spec, watcher.selection)["items"]:
                watcher.queue.put_nowait({"type": "ADDED", "object": obj})
        else:
            # Resume: rebuild what the client saw at that version, then replay what followed.
            try:
                since_rv = int(since)
            except ValueError:
                raise api_error(400, "BadRequest", f"invalid resourceVersion {since!r}") from None
            for rv, event_spec, event in self._history:
                if event_spec is not spec:
                    continue
                if rv <= since_rv:
                    watcher.translate(event)
                else:
                    watcher.queue.put_nowait(event)
        self._watchers.add(watcher)
        return watcher

    def _emit(self, spec: ResourceSpec, event_type: str, obj: JsonObj) -> None:
        event = {"type": event_type, "object": obj}
        self._history.append((int(obj["metadata"]["resourceVersion"]), spec, event))
        for watcher in self._watchers:
            if watcher.spec is spec:
                watcher.queue.put_nowait(event)

    def _next_rv(self) -> str:
        self.resource_version += 1
        return str(self.resource_version)

    def _store(self, spec: ResourceSpec, obj: JsonObj) -> None:
        key = (spec.ref, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if key in self._objects:
            self._objects[key].history.append(obj)
        else:
            self._objects[key] = obj

    def _admit(self, spec: ResourceSpec, obj: JsonObj, verb: str) -> None:
        """Default and validate the would-be stored object; 422 (and a record) if invalid."""
        meta = obj["metadata"]
        error: FieldError | None = check_metadata(meta, dns_label_name=spec.plural == "namespaces")
        if error is None and spec.crd is not None:
            spec.crd.default(obj)
            error = spec.crd.validate(obj) or self._schemas.validate_metadata(meta)
        elif (
            error is None
            and spec.crd is None
            and self._schemas.has_schema(spec.api_version, spec.kind)
        ):
            error = self._schemas.validate(obj)
        if error is None:
            return
        name = meta.get("name")
        self.rejections.append(
            Rejection(
                verb, spec.group_resource, meta.get("namespace"), name, error.path, error.message
            )
        )
        kind = f"{spec.kind}.{spec.group}" if spec.group else spec.kind
        raise api_error(
            422,
            "Invalid",
            f'{kind} "{name}" is invalid: {error.path}: {error.message}',
            name=name,
            group=spec.group,
            kind=spec.kind,
            causes=[{"reason": "FieldValueInvalid", "message": error.message, "field": error.path}],
        )

    def _create(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        body: Any,
        *,
        verb: str,
        manager: str = "kube-apiserver",
        managed: list[JsonObj] | None = None,
    ) -> JsonObj:
        """Store a new object; ``managed``: its managedFields (an apply's), else ``manager``
        owns every field it set."""
        if not isinstance(body, Mapping) or not isinstance(body.get("metadata", {}), Mapping):
            raise api_error(400, "BadRequest", "the body must be a JSON object with metadata")
        # apiVersion and kind first: the order a reader (and kubectl) expects.
        obj: JsonObj = {"apiVersion": spec.api_version, "kind": spec.kind}
        obj |= copy.deepcopy(dict(body))
        for field_name, expected in (("apiVersion", spec.api_version), ("kind", spec.kind)):
            if obj[field_name] != expected:
                raise api_error(
                    400,
                    "BadRequest",
                    f"{field_name} {obj[field_name]!r} does not match the URL's {expected!r}",
                )
        meta = obj.setdefault("metadata", {})
        if spec.namespaced:
            if meta.setdefault("namespace", namespace) != namespace:
                raise api_error(
                    400,
                    "BadRequest",
                    "the namespace of the object does not match the namespace on the request",
                )
            ns_obj = self._find(self.specs["", "v1", "namespaces"], None, namespace or "")
            if self.require_namespace and ns_obj is None:
                raise api_error(404, "NotFound", f'namespaces "{namespace}" not found')
            if ns_obj is not None and ns_obj["metadata"].get("deletionTimestamp"):
                raise api_error(
                    403,
                    "Forbidden",
                    f"unable to create new content in namespace "
                    f"{namespace} because it is being terminated",
                )
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise api_error(
                    422, "Invalid", "metadata.name or metadata.generateName is required"
                )
            for _ in range(16):  # the apiserver also just retries on a taken random name
                meta["name"] = prefix + "".join(random.choices(_NAME_CHARS, k=5))
                if self._find(spec, meta.get("namespace"), meta["name"]) is None:
                    break
        if self._find(spec, meta.get("namespace"), meta["name"]) is not None:
            raise api_error(
                409,
                "AlreadyExists",
                f'{spec.group_resource} "{meta["name"]}" already exists',
                name=meta["name"],
                group=spec.group,
                kind=spec.plural,
            )
        for server_owned in (
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
            "managedFields",
        ):
            meta.pop(server_owned, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if spec.status:  # status is written through /status only
            obj.pop("status", None)
        if managed is None:
            managed = self._fields(spec).update(None, obj, manager)
        if managed:
            meta["managedFields"] = managed
        if spec.initial_status is not None:
            obj["status"] = copy.deepcopy(dict(spec.initial_status))
        self._admit(spec, obj, verb)
        served: list[ResourceSpec] = []
        if spec is self.specs[CRDS.group, CRDS.version, CRDS.plural]:
            try:
                served = self._crd_resources(obj)
            except Exception as e:  # a schema we cannot compile: refused like any invalid write
                raise api_error(422, "Invalid", f"the CRD's schema is not usable: {e}") from None
        meta["resourceVersion"] = self._next_rv()
        self._store(spec, obj)
        for served_spec in served:
            self.add_resource(served_spec)
        self._emit(spec, "ADDED", obj)
        if meta.get("ownerReferences"):
            self._collect_garbage()  # an owner that is already gone takes this one along
        return obj

    def _fields(self, spec: ResourceSpec) -> FieldManager:
        key = (spec.group, spec.version, spec.plural)
        manager = self._field_managers.get(key)
        if manager is None:
            shape = kind_shape(
                self._schemas.version,
                spec.group,
                spec.version,
                spec.kind,
                spec.crd.openapi if spec.crd is not None else None,
            )
            manager = self._field_managers[key] = FieldManager(
                shape, spec.api_version, status_subresource=spec.status, clock=now_rfc3339
            )
        return manager

    @staticmethod
    def _manager_name(request: rendering.Request) -> str:
        """The request's fieldManager, else its User-Agent up to the first "/" (as the
        apiserver names a client that gives none: "OpenAPI-Generator" for the Python client)."""
        given = request.params.get("fieldManager")
        if given:
            return given
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        return agent.split("/")[0][:128]

    def _apply(
        self, spec: ResourceSpec, namespace: str | None, name: str, request: rendering.Request
    ) -> Any:
        """Server-side apply (see fieldmanager.py): creates the object if it is missing."""
        manager = request.params.get("fieldManager", "")
        if not manager:
            raise api_error(
                422,
                "Invalid",
                'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: '
                "is required for apply patch",
            )
        if request.subresource is not None:
            raise api_error(
                415, "UnsupportedMediaType", "the emulator does not apply to subresources"
            )
        config = request.data
        if config is None and request.text.strip():
            try:
                config = yaml.safe_load(request.text)
            except yaml.YAMLError as e:
                raise api_error(400, "BadRequest", f"error decoding YAML: {e}") from None
        if not isinstance(config, Mapping) or not isinstance(config.get("metadata", {}), Mapping):
            raise api_error(400, "BadRequest", "an apply patch must be an object with metadata")
        for field_name, expected in (("apiVersion", spec.api_version), ("kind", spec.kind)):
            if config.get(field_name) != expected:
                raise api_error(
                    400, "BadRequest", f"{field_name} must be {expected!r} in an apply patch"
                )
        meta = config.get("metadata") or {}
        if meta.get("name", name) != name:
            raise api_error(
                400,
                "BadRequest",
                f"the name of the object ({meta['name']}) does not match the name on the URL "
                f"({name})",
            )
        if meta.get("managedFields") is not None:
            raise api_error(400, "BadRequest", "metadata.managedFields must be nil")
        live = self._find(spec, namespace, name)
        try:
            new, managed = self._fields(spec).apply(
                live, config, manager, force=request.params.get("force") == "true"
            )
        except ApplyConflict as e:
            self.conflicts.append(f"apply {spec.group_resource}/{name}: {e.message}")
            raise api_error(409, "Conflict", e.message, causes=e.causes) from None
        if live is None:
            new.setdefault("metadata", {})["name"] = name
            created = self._create(spec, namespace, new, verb="patch", managed=managed)
            return rendering.Response(status=201, payload=created)
        return self._commit(spec, live, new, request, verb="patch", managed=managed)

    def _update(
        self, spec: ResourceSpec, namespace: str | None, name: str, request: rendering.Request
    ) -> JsonObj:
        old = self._get_or_404(spec, namespace, name)
        verb = "patch" if request.method.value == "PATCH" else "update"
        body = request.data
        content_type = _content_type(request)
        if verb == "patch" and "force" in request.params:
            raise api_error(
                422,
                "Invalid",
                'PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: '
                "may not be specified for non-apply patch",
            )
        new: Any
        if verb == "update":
            if not isinstance(body, Mapping):
                raise api_error(400, "BadRequest", "PUT needs the whole object")
            new = copy.deepcopy(dict(body))
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            # Strategic merge is a plain merge here: lists are replaced, not merged by key.
            if not isinstance(body, Mapping):
                raise api_error(400, "BadRequest", "a merge patch must be a JSON object")
            new = merge_patch(copy.deepcopy(old), body)
        elif content_type == "application/json-patch+json":
            new = self._json_patch(spec, old, body)
        else:
            raise api_error(
                415, "UnsupportedMediaType", f"the emulator does not support {content_type!r}"
            )
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise api_error(422, "Invalid", "the patched object must stay a JSON object")
        requested = new.get("metadata", {}).get("managedFields")
        return self._commit(spec, old, new, request, verb=verb, requested=requested)

    def _commit(
        self,
        spec: ResourceSpec,
        old: JsonObj,
        new: JsonObj,
        request: rendering.Request,
        *,
        verb: str,
        managed: list[JsonObj] | None = None,
        requested: Any = None,
    ) -> JsonObj:
        """Store ``new`` over ``old`` (what a PUT, a patch or an apply made of it).

        ``managed``: the managedFields an apply computed; otherwise the request's manager
        owns what it changed (``requested``: managedFields the request itself carried)."""
        namespace, name = old["metadata"].get("namespace"), old["metadata"]["name"]
        old_rv = old["metadata"]["resourceVersion"]
        meta = new.setdefault("metadata", {})
        # A resourceVersion in a PUT body or a patch is a precondition (optimistic concurrency).
        given_rv = meta.get("resourceVersion")
        if given_rv is not None and str(given_rv) != old_rv:
            self.conflicts.append(f"{verb} {spec.group_resource}/{name}: rv {given_rv} != {old_rv}")
            raise api_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {spec.group_resource} "{name}": '
                "the object has been modified; please apply your changes to the "
                "latest version and try again",
                name=name,
                kind=spec.plural,
            )
        if meta.get("name", name) != name or meta.get(
            "namespace", old["metadata"].get("namespace")
        ) != old["metadata"].get("namespace"):
            raise api_error(
                400, "BadRequest", "the name/namespace of the object does not match the URL"
            )
        if meta.get("uid", old["metadata"]["uid"]) != old["metadata"]["uid"]:
            raise api_error(
                409,
                "Conflict",
                "Precondition failed: UID in object meta does not match the stored object",
            )
        if request.subresource == "status":
            # /status changes .status and nothing else.
            candidate = copy.deepcopy(old)
            if "status" in new:
                candidate["status"] = new["status"]
            else:
                candidate.pop("status", None)
            new = candidate
        else:
            # Server-owned metadata stays as it is; the status subresource owns .status.
            for server_owned in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
                "selfLink",
                "managedFields",
            ):
                if server_owned in old["metadata"]:
                    meta[server_owned] = copy.deepcopy(old["metadata"][server_owned])
                else:
                    meta.pop(server_owned, None)
            new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
            if spec.status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
        meta = new["metadata"]
        if managed is None:
            subresource = request.subresource or ""
            managed = self._fields(spec).update(
                old,
                new,
                self._manager_name(request),
                subresource=subresource,
                requested=None if subresource else requested,
            )
        if managed:
            meta["managedFields"] = managed
        else:
            meta.pop("managedFields", None)
        if old["metadata"].get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old["metadata"].get("finalizers") or [])
            if added:
                error = "no new finalizers can be added if the object is being deleted"
                self.rejections.append(
                    Rejection(
                        verb, spec.group_resource, namespace, name, "metadata.finalizers", error
                    )
                )
                raise api_error(
                    422,
                    "Invalid",
                    f'{spec.kind} "{name}" is invalid: metadata.finalizers: Forbidden: {error}',
                )
        self._admit(spec, new, verb)
        if new == old:
            return old  # a no-op write changes nothing, not even the resourceVersion
        if {k: v for k, v in new.items() if k not in ("metadata", "status")} != {
            k: v for k, v in old.items() if k not in ("metadata", "status")
        }:
            meta["generation"] = int(old["metadata"].get("generation", 0)) + 1
        meta["resourceVersion"] = self._next_rv()
        self._store(spec, new)
        self._emit(spec, "MODIFIED", new)
        if (
            meta.get("deletionTimestamp")
            and not meta.get("finalizers")
            and (spec.plural != "namespaces" or self._namespace_is_empty(name))
        ):
            self._remove(spec, new)  # the last finalizer is gone: the deletion completes
        elif meta.get("ownerReferences") != old["metadata"].get("ownerReferences"):
            self._collect_garbage()
        return new

    def _json_patch(self, spec: ResourceSpec, old: JsonObj, ops: Any) -> Any:
        if not isinstance(ops, list):
            raise api_error(400, "BadRequest", "a JSON patch must be a list of operations")
        try:
            patched: Any = jsonpatch.JsonPatch(ops).apply(copy.deepcopy(old))
            return patched
        except jsonpatch.JsonPatchTestFailed as e:
            # kube-apiserver answers 422 here, and Kopf relies on it (it retries next cycle).
            name = old["metadata"]["name"]
            self.conflicts.append(f"json-patch {spec.group_resource}/{name}: {e}")
            raise api_error(
                422,
                "Invalid",
                f"the server rejected our request due to an error in our request: {e}",
                name=name,
            ) from None
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise api_error(422, "Invalid", f"the JSON patch does not apply: {e}") from None
        except (TypeError, KeyError, ValueError) as e:
            raise api_error(400, "BadRequest", f"malformed JSON patch: {e}") from None

    def _delete(
        self,
        spec: ResourceSpec,
        namespace: str | None,
        name: str,
        options: Any,
        params: Mapping[str, str],
    ) -> JsonObj:
        obj = self._get_or_404(spec, namespace, name)
        options = options if isinstance(options, Mapping) else {}
        meta = obj["metadata"]
        preconditions = options.get("preconditions") or {}
        for field_name in ("uid", "resourceVersion"):
            wanted = preconditions.get(field_name)
            if wanted is not None and wanted != meta.get(field_name):
                raise api_error(
                    409,
                    "Conflict",
                    f"Precondition failed: {field_name} {wanted} != {meta.get(field_name)}",
                )
        policy = options.get("propagationPolicy") or params.get("propagationPolicy")
        if policy == "Orphan" or options.get("orphanDependents") is True:
            self._orphaning.add(meta["uid"])
        if meta.get("deletionTimestamp"):
            return obj  # already being deleted: nothing more to do
        if spec.plural == "namespaces":
            # The namespace controller's job: delete the content, then the namespace itself.
            for content_spec in self.specs.values():
                if content_spec.namespaced:
                    for key, _ in list(self._live_items(content_spec)):
                        if key[1] == name:
                            self._delete(content_spec, name, key[2], None, {})
            if not self._namespace_is_empty(name):
                return self._mark_deleting(spec, obj, status={"phase": "Terminating"})
        if meta.get("finalizers"):
            return self._mark_deleting(spec, obj)
        return self._remove(spec, obj)

    def _mark_deleting(
        self, spec: ResourceSpec, obj: JsonObj, status: Mapping[str, Any] | None = None
    ) -> JsonObj:
        new = copy.deepcopy(obj)
        meta = new["metadata"]
        meta["deletionTimestamp"] = now_rfc3339()
        meta["deletionGracePeriodSeconds"] = 0
        meta["generation"] = int(meta.get("generation", 0)) + 1  # as the apiserver does
        if status:
            new["status"] = {**new.get("status", {}), **status}
        meta["resourceVersion"] = self._next_rv()
        self._store(spec, new)
        self._emit(spec, "MODIFIED", new)
        return new

    def _remove(self, spec: ResourceSpec, obj: JsonObj, *, collect: bool = True) -> JsonObj:
        final = copy.deepcopy(obj)
        final["metadata"]["resourceVersion"] = self._next_rv()
        self._store(spec, final)
        key = (spec.ref, final["metadata"].get("namespace"), final["metadata"]["name"])
        self._objects[key].delete()
        self._emit(spec, "DELETED", final)
        uid = final["metadata"]["uid"]
        if uid in self._orphaning:
            self._orphaning.discard(uid)
            self._orphan_dependents(uid)
        if collect:
            self._collect_garbage()
        return final

    def _orphan_dependents(self, owner_uid: str) -> None:
        for spec in list(self.specs.values()):
            for _, obj in list(self._live_items(spec)):
                refs = obj["metadata"].get("ownerReferences") or []
                if any(ref.get("uid") == owner_uid for ref in refs):
                    new = copy.deepcopy(obj)
                    kept = [ref for ref in refs if ref.get("uid") != owner_uid]
                    if kept:
                        new["metadata"]["ownerReferences"] = kept
                    else:
                        new["metadata"].pop("ownerReferences")
                    new["metadata"]["resourceVersion"] = self._next_rv()
                    self._store(spec, new)
                    self._emit(spec, "MODIFIED", new)

    def _namespace_is_empty(self, namespace: str) -> bool:
        return not any(
            key[1] == namespace
            for spec in self.specs.values()
            if spec.namespaced
            for key, _ in self._live_items(spec)
        )

    def _collect_garbage(self) -> None:
        """Background cascading deletion, to a fixed point (owners of owners, ...)."""
        while True:
            live = [
                (spec, key, obj)
                for spec in list(self.specs.values())
                for key, obj in self._live_items(spec)
            ]
            uids = {obj["metadata"]["uid"] for _, _, obj in live}
            progress = False
            for spec, key, obj in live:
                meta = obj["metadata"]
                refs = meta.get("ownerReferences") or []
                if meta.get("deletionTimestamp"):
                    if (
                        spec.plural == "namespaces"
                        and not meta.get("finalizers")
                        and self._namespace_is_empty(key[2])
                    ):
                        self._remove(spec, obj, collect=False)
                        progress = True
                    continue
                if refs and all(ref.get("uid") not in uids for ref in refs):
                    if meta.get("finalizers"):
                        self._mark_deleting(spec, obj)
                    else:
                        self._remove(spec, obj, collect=False)
                    progress = True
            if not progress:
                return
