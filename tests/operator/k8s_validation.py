"""What the emulator checks before it stores an object, as a real API server would.

Builtin kinds are validated against the official OpenAPI schemas that kubernetes-validate ships
(offline, the "strict" flavour: unknown fields fail). Custom resources are defaulted and
validated against their CRD's ``openAPIV3Schema``; unlike a real server, fields the schema does
not declare are refused instead of pruned, so that tests notice them. Then their CEL rules
(``x-kubernetes-validations``) are evaluated as the API server does (``crd_cel.py``), and the
first one that refuses is the error, with the rule's message.

Compiled validators are cached (per Kubernetes version and kind, per CRD version): an
integration test writes hundreds of objects and must not re-read 1.4 MB of definitions each time.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from importlib import resources as importlib_resources
from typing import Any

import jsonschema
import jsonschema.exceptions
import referencing
from packaging.version import Version

from tests.operator import crd_cel

_SCHEMA_PACKAGE = "kubernetes_validate"
_SCHEMA_ROOT = "kubernetes-json-schema"
_DEFINITIONS_ID = "https://kubernetes.io/api/_definitions.json"
_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"

# Names and labels, as the apiserver's apimachinery validation spells them.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class FieldError:
    """One refused field: a dotted path such as ``spec.containers[0].image`` and why."""

    path: str
    message: str


def format_path(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _error_from_jsonschema(error: jsonschema.exceptions.ValidationError) -> FieldError:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        # Name the unknown field itself, not its parent: that is what a reader looks for.
        declared = error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
        unknown = sorted(str(key) for key in error.instance if key not in declared)
        if unknown:
            return FieldError(format_path([*path, unknown[0]]), "field not declared in schema")
    return FieldError(format_path(path), error.message)


def _first_error(validator: jsonschema.protocols.Validator, instance: Any) -> FieldError | None:
    best = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    return None if best is None else _error_from_jsonschema(best)


# --- builtin kinds -------------------------------------------------------------------------------


def _available_versions() -> list[str]:
    root = importlib_resources.files(_SCHEMA_PACKAGE).joinpath(_SCHEMA_ROOT)
    found = {
        entry.name[1:].removesuffix("-local-strict")
        for entry in root.iterdir()
        if entry.name.startswith("v") and entry.name.endswith("-local-strict")
    }
    return sorted(found, key=Version)


def _resolve_version(wanted: str) -> str:
    """The newest bundled schema set not newer than ``wanted`` (as kubernetes-validate does)."""
    wanted_mm = Version(wanted.removeprefix("v")).release[:2]
    candidates = [v for v in _available_versions() if Version(v).release[:2] <= wanted_mm]
    if not candidates:
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {wanted}")
    return candidates[-1]


def _read_json(version: str, filename: str) -> dict[str, Any] | None:
    path = importlib_resources.files(_SCHEMA_PACKAGE).joinpath(
        _SCHEMA_ROOT, f"v{version}-local-strict", filename
    )
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@functools.lru_cache(maxsize=4)
def _definitions_file(version: str) -> dict[str, Any]:
    definitions = _read_json(version, "_definitions.json")
    if definitions is None:
        raise ValueError(f"kubernetes-validate {version} has no _definitions.json")
    return definitions


def definitions(version: str) -> Mapping[str, Any]:
    """The bundled OpenAPI definitions by name (``$defs``): how the emulator's server-side
    apply learns which lists merge by key. Read once per version, shared with validation."""
    defs: Mapping[str, Any] = _definitions_file(version)["$defs"]
    return defs


@functools.lru_cache(maxsize=4)
def _registry(version: str) -> referencing.Registry[Any]:
    # Shared by every emulator of the session: the definitions are the expensive part.
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        _DEFINITIONS_ID, referencing.Resource.from_contents(_definitions_file(version))
    )
    return registry


@functools.lru_cache(maxsize=256)
def _builtin_validator(version: str, api_version: str, kind: str) -> Any:
    # kubernetes-validate names its files "<kind>-<group's first label>-<version>.json".
    api_part = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = _read_json(version, f"{kind.lower()}-{api_part}.json")
    if schema is None:
        return None
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


@functools.lru_cache(maxsize=4)
def _object_meta_validator(version: str) -> Any:
    schema = {"$ref": f"{_DEFINITIONS_ID}#/$defs/{_OBJECT_META}"}
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


def validators_built() -> int:
    """Definition registries and builtin-kind validators compiled so far in this process (the
    caches' misses): writes of kinds seen before compile nothing."""
    caches = (_registry, _builtin_validator, _object_meta_validator)
    return sum(cache.cache_info().misses for cache in caches)


class BuiltinSchemas:
    """Strict OpenAPI validation of builtin kinds for one Kubernetes version."""

    def __init__(self, k8s_version: str = "1.33") -> None:
        self.version = _resolve_version(k8s_version)

    def has_schema(self, api_version: str, kind: str) -> bool:
        return _builtin_validator(self.version, api_version, kind) is not None

    def validate(self, obj: Mapping[str, Any]) -> FieldError | None:
        validator = _builtin_validator(self.version, str(obj["apiVersion"]), str(obj["kind"]))
        return None if validator is None else _first_error(validator, obj)

    def validate_metadata(self, metadata: Mapping[str, Any]) -> FieldError | None:
        error = _first_error(_object_meta_validator(self.version), metadata)
        return None if error is None else FieldError(f"metadata.{error.path}", error.message)


def check_metadata(metadata: Mapping[str, Any], *, dns_label_name: bool) -> FieldError | None:
    """Name and label syntax: what apimachinery checks for every kind, beyond the schema."""
    name = metadata.get("name")
    pattern, limit = (_DNS_LABEL, 63) if dns_label_name else (_DNS_SUBDOMAIN, 253)
    if not isinstance(name, str) or len(name) > limit or not pattern.match(name):
        kind = "RFC 1123 label" if dns_label_name else "RFC 1123 subdomain"
        return FieldError("metadata.name", f"{name!r} is not a valid {kind}")
    labels = metadata.get("labels") or {}
    if not isinstance(labels, Mapping):
        return FieldError("metadata.labels", "must be a map of strings")
    for key, value in labels.items():
        prefix, _, label_name = str(key).rpartition("/")
        if (
            (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)))
            or len(label_name) > 63
            or not _LABEL_NAME.match(label_name)
        ):
            return FieldError(f"metadata.labels[{key}]", "invalid label key")
        bad_value = value and not _LABEL_NAME.match(str(value))
        if not isinstance(value, str) or len(value) > 63 or bad_value:
            return FieldError(f"metadata.labels[{key}]", f"invalid label value {value!r}")
    return None


# --- custom resources ----------------------------------------------------------------------------

_LOGIC_KEYS = ("allOf", "anyOf", "oneOf")
# Keys of the OpenAPI v3 dialect that JSON Schema either lacks or spells differently.
_DROPPED_KEYS = {"nullable", "default", "description", "example", "externalDocs", "format"}


def _to_jsonschema(node: Mapping[str, Any], *, in_logic: bool = False) -> dict[str, Any]:
    """Translate a structural CRD schema node into JSON Schema 2020-12 (recursively)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _to_jsonschema(sub, in_logic=in_logic) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = _to_jsonschema(value, in_logic=in_logic)
        elif key in _LOGIC_KEYS:
            out[key] = [_to_jsonschema(sub, in_logic=True) for sub in value]
        elif key == "not":
            out[key] = _to_jsonschema(value, in_logic=True)
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool):
            # OpenAPI 3.0 flags the bound as exclusive; JSON Schema carries the number itself.
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            if value and bound in node:
                out[key] = node[bound]
        elif key.startswith("x-kubernetes-") or key in _DROPPED_KEYS:
            continue
        else:
            out[key] = copy.deepcopy(value)
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        bound = "minimum" if key == "exclusiveMinimum" else "maximum"
        if node.get(key) is True:
            out.pop(bound, None)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        if not any(key in out for key in _LOGIC_KEYS):
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            props.setdefault(name, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    is_object = node.get("type") == "object" or "properties" in node
    open_ended = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
    if is_object and not in_logic and not open_ended:
        # A real server prunes undeclared fields silently; refusing them makes tests notice.
        out["additionalProperties"] = False
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    """Structural defaulting in place, as the apiserver does it (also inside items and maps)."""
    if isinstance(value, MutableMapping):
        props: Mapping[str, Any] = schema.get("properties") or {}
        for name, sub in props.items():
            # Nulls in non-nullable fields are pruned before defaulting (apiserver behaviour).
            if name in value and value[name] is None and not sub.get("nullable"):
                del value[name]
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name in list(value):
                if name not in props:
                    apply_defaults(value[name], extra)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for item in value:
                apply_defaults(item, items)


class CrdSchema:
    """One served version of a CRD: defaults, then validates (unknown fields refused)."""

    def __init__(self, openapi_schema: Mapping[str, Any]) -> None:
        self.openapi = copy.deepcopy(dict(openapi_schema))
        root = copy.deepcopy(self.openapi)
        props = dict(root.get("properties") or {})
        # apiVersion/kind/metadata belong to the server; metadata is checked as ObjectMeta.
        props["apiVersion"] = {"type": "string"}
        props["kind"] = {"type": "string"}
        props["metadata"] = {}
        root["properties"] = props
        root.setdefault("type", "object")
        schema = _to_jsonschema(root)
        jsonschema.Draft202012Validator.check_schema(schema)
        self.jsonschema = schema
        self._validator = jsonschema.Draft202012Validator(schema)

    def default(self, obj: MutableMapping[str, Any]) -> None:
        for name, sub in (self.openapi.get("properties") or {}).items():
            if name == "metadata":
                continue
            if name in obj and obj[name] is None and not sub.get("nullable"):
                del obj[name]
            if name not in obj and "default" in sub:
                obj[name] = copy.deepcopy(sub["default"])
            if name in obj:
                apply_defaults(obj[name], sub)

    def validate(self, obj: Mapping[str, Any]) -> FieldError | None:
        error = _first_error(self._validator, obj)
        if error is not None:
            return error
        for violation in crd_cel.violations(obj, self.openapi):
            # As kube-apiserver words a refusing rule: `spec.x: Invalid value: "object": ...`.
            return FieldError(
                format_path(violation.path), f'Invalid value: "object": {violation.message}'
            )
        return None
