"""Field ownership for the API emulator: ``metadata.managedFields`` and server-side apply.

kube-apiserver's field manager (sigs.k8s.io/structured-merge-diff), cut down to what
meshaccel's objects need:

* every write records who set what: one ``Update`` entry per manager (the request's
  ``fieldManager``, else its User-Agent up to the first "/", as the real server names it)
  gains the fields the write added or changed; fields it changed or removed leave every other
  manager's entry (a non-apply write always wins);
* an apply (``application/apply-patch+yaml``) merges the applied configuration into the live
  object (or makes it), and its manager's ``Apply`` entry becomes exactly the fields applied;
  those applied last time and not now are removed from the object unless another manager
  owns them; changing a field another manager owns is a conflict (409 listing the fields and
  owners) unless ``force=true``, which takes the field over;
* lists and maps merge as the schema says: ``x-kubernetes-list-type: map`` by its
  ``x-kubernetes-list-map-keys`` (containers, env, volumes by name; ports by containerPort
  and protocol; volumeMounts by mountPath; ownerReferences by uid), ``set`` (finalizers) by
  value, anything else atomic; ``x-kubernetes-map-type: atomic`` maps (a pod's
  ``nodeSelector``) are owned whole. Builtin kinds use the OpenAPI definitions bundled with
  kubernetes-validate, custom resources their CRD's schema, other kinds own atomic lists;
* server-set metadata (name, uid, resourceVersion, ...) is nobody's; ``status`` of a kind with
  a status subresource is owned through ``/status`` only (entries marked ``subresource``);
* managedFields a request carries replace the stored ones when they parse (a client may hand
  ownership over, as ``kubectl`` does when moving to server-side apply); ``[{}]`` clears them.

Limits: one version per kind (no conversion between apiVersions); a ``null`` in an applied
configuration removes the field; items an apply adds to a keyed list go after the live ones
(the real server follows the applied order); a map or list that loses its last field to
pruning goes too (the real server keeps an empty struct); apply to a subresource, unions,
``ignoredFields``, key fields filled in by defaulting, and the exact times are not emulated.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from tests.operator.k8s_validation import definitions

JsonObj = dict[str, Any]
# A field as managedFields name it: a tuple of fieldsV1 elements such as "f:spec",
# 'k:{"name":"agent"}' (a keyed list's item), 'v:"x"' (a set's item).
Path = tuple[str, ...]

_OBJECT_META: Final = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
# Metadata the server sets: in no manager's fields (the real field manager strips it too).
_SERVER_METADATA: Final = frozenset(
    {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    }
)


class _Item:
    """A keyed list's item as such (the "." of fieldsV1): it is there or not, never modified."""


_ITEM: Final = _Item()


# --- schemas --------------------------------------------------------------------------------------


def _resolve(node: Any, defs: Mapping[str, Any]) -> Mapping[str, Any]:
    found: Mapping[str, Any] = node if isinstance(node, Mapping) else {}
    while True:
        ref = found.get("$ref")
        all_of = found.get("allOf")
        if ref is None and isinstance(all_of, list) and len(all_of) == 1:
            ref = all_of[0].get("$ref") if isinstance(all_of[0], Mapping) else None
        if ref is None:
            return found
        found = defs.get(str(ref).rsplit("/", 1)[-1]) or {}


class Shape:
    """One schema node, as far as merging and field sets care: how its lists and maps merge.
    Children are made when first asked for (a kind's schema is large, objects use little)."""

    def __init__(self, node: Any, defs: Mapping[str, Any]) -> None:
        self._defs = defs
        self._node = _resolve(node, defs)
        self._children: dict[str, Shape] = {}
        self._item: Shape | None = None
        self.atomic_map = self._node.get("x-kubernetes-map-type") == "atomic"
        # A Go map (labels, data), not a struct: empty, it is omitted, so no field at all.
        self.go_map = "additionalProperties" in self._node and not self._node.get("properties")
        list_type = self._node.get("x-kubernetes-list-type")
        keys = tuple(self._node.get("x-kubernetes-list-map-keys") or ())
        merge_key = self._node.get("x-kubernetes-patch-merge-key")
        if list_type is None and merge_key:
            list_type, keys = "map", (str(merge_key),)
        self.keys = keys
        self.list_type = (
            list_type if list_type == "set" or (list_type == "map" and keys) else "atomic"
        )

    def field(self, name: str) -> Shape:
        child = self._children.get(name)
        if child is None:
            properties = self._node.get("properties") or {}
            extra = self._node.get("additionalProperties")
            node = properties.get(name, extra if isinstance(extra, Mapping) else None)
            child = self._children[name] = Shape(node, self._defs)
        return child

    @property
    def item(self) -> Shape:
        if self._item is None:
            self._item = Shape(self._node.get("items"), self._defs)
        return self._item

    def element(self, item: Any) -> str:
        """A list item's fieldsV1 element: ``k:{...}`` in a keyed list, ``v:...`` in a set."""
        if self.list_type == "map" and isinstance(item, Mapping):
            return "k:" + _compact({key: item[key] for key in sorted(self.keys) if key in item})
        return "v:" + _compact(item)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


@functools.lru_cache(maxsize=4)
def _kinds(version: str) -> dict[tuple[str, str, str], str]:
    """(group, version, kind) -> definition name, for one Kubernetes version's definitions."""
    found: dict[tuple[str, str, str], str] = {}
    for name, node in definitions(version).items():
        for gvk in node.get("x-kubernetes-group-version-kind") or ():
            found[gvk.get("group", ""), gvk.get("version", ""), gvk.get("kind", "")] = name
    return found


def kind_shape(
    version: str, group: str, api_version: str, kind: str, crd: Mapping[str, Any] | None = None
) -> Shape:
    """The shape of a kind: its CRD's ``openAPIV3Schema`` if given, else the builtin
    definition of Kubernetes ``version``; metadata is ObjectMeta either way."""
    defs = definitions(version)
    meta = {"$ref": f"#/$defs/{_OBJECT_META}"}
    if crd is not None:
        return Shape(
            {**crd, "properties": {**(crd.get("properties") or {}), "metadata": meta}}, defs
        )
    name = _kinds(version).get((group, api_version, kind))
    return Shape({"$ref": f"#/$defs/{name}"} if name else {"properties": {"metadata": meta}}, defs)


# --- field sets -----------------------------------------------------------------------------------


def _collect(value: Any, shape: Shape, prefix: Path, out: dict[Path, Any]) -> None:
    """The owned fields of ``value`` and their values: scalars, atomic lists and maps, empty
    structs, and keyed lists' items (as :data:`_ITEM`) and sets' items."""
    if isinstance(value, Mapping) and value and not shape.atomic_map:
        for key, child in value.items():
            _collect(child, shape.field(key), (*prefix, f"f:{key}"), out)
    elif isinstance(value, list) and value and shape.list_type != "atomic":
        for item in value:
            path = (*prefix, shape.element(item))
            out[path] = _ITEM if shape.list_type == "map" else item
            if shape.list_type == "map" and isinstance(item, Mapping):
                for key, child in item.items():
                    _collect(child, shape.item.field(key), (*path, f"f:{key}"), out)
    elif prefix and not (isinstance(value, Mapping) and not value and shape.go_map):
        out[prefix] = value


def _compare(
    before: Mapping[Path, Any], after: Mapping[Path, Any]
) -> tuple[set[Path], set[Path], set[Path]]:
    """(added, removed, modified) between two field sets."""
    added = set(after.keys() - before.keys())
    removed = set(before.keys() - after.keys())
    modified = {
        path
        for path in before.keys() & after.keys()
        if before[path] is not _ITEM
        and (before[path] != after[path] or type(before[path]) is not type(after[path]))
    }
    return added, removed, modified


def paths_of(fields: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    """The fields a fieldsV1 tree names."""
    found: set[Path] = set()
    for element, inner in fields.items():
        if element == ".":
            found.add(prefix)
        elif isinstance(inner, Mapping) and inner:
            found |= paths_of(inner, (*prefix, element))
        else:
            found.add((*prefix, element))
    return found


def fields_v1(paths: Iterable[Path]) -> JsonObj:
    """The fieldsV1 tree of some fields ("." marks a field that has owned fields inside)."""
    tree: JsonObj = {}
    members = [path for path in paths if path]
    for path in members:
        node = tree
        for element in path:
            node = node.setdefault(element, {})
    for path in members:
        node = tree
        for element in path:
            node = node[element]
        if node and "." not in node:
            node["."] = {}
    return _sorted(tree)


def _sorted(tree: Mapping[str, Any]) -> JsonObj:
    return {key: _sorted(tree[key]) for key in sorted(tree)}


def format_path(path: Path) -> str:
    """A field as kube-apiserver prints it in a conflict: ``.spec.containers[name="agent"]``."""
    text = ""
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            text += f".{rest}"
        elif kind == "k":
            keys = json.loads(rest)
            text += "[" + ",".join(f"{key}={_compact(value)}" for key, value in keys.items()) + "]"
        elif kind == "v":
            text += f"[={rest}]"
        else:
            text += f"[{rest}]"
    return text


# --- merging and removing -------------------------------------------------------------------------


def _merge(live: Any, config: Any, shape: Shape) -> Any:
    """``config`` merged into ``live``: maps field by field, keyed lists and sets item by item."""
    if isinstance(config, Mapping) and not shape.atomic_map:
        base = live if isinstance(live, Mapping) else {}
        merged = dict(base)
        for key, value in config.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = _merge(base.get(key), value, shape.field(key))
        return merged
    if isinstance(config, list) and isinstance(live, list) and shape.list_type != "atomic":
        wanted = {shape.element(item): item for item in config}
        items = []
        for item in live:
            element = shape.element(item)
            items.append(
                _merge(item, wanted.pop(element), shape.item) if element in wanted else item
            )
        return items + [copy.deepcopy(item) for item in wanted.values()]
    return copy.deepcopy(config)


def _step(node: Any, element: str, shape: Shape) -> tuple[Any, Any, Shape] | None:
    """(key or index, child, child's shape) of one fieldsV1 element, or None if absent."""
    kind, _, text = element.partition(":")
    if kind == "f" and isinstance(node, dict) and text in node:
        return text, node[text], shape.field(text)
    if kind in ("k", "v") and isinstance(node, list):
        for index, item in enumerate(node):
            if shape.element(item) == element:
                return index, item, shape.item
    return None


def _is_key_field(path: Path) -> bool:
    """Whether ``path`` is a key field of a keyed list's item (``name`` in ``k:{"name":...}``)."""
    if len(path) < 2 or not path[-2].startswith("k:") or not path[-1].startswith("f:"):
        return False
    return path[-1][2:] in json.loads(path[-2][2:])


def _remove(obj: JsonObj, path: Path, shape: Shape) -> None:
    """Remove one field, and the maps and lists it leaves empty (never the object itself)."""
    trail: list[tuple[Any, Any]] = []
    node: Any = obj
    for element in path:
        found = _step(node, element, shape)
        if found is None:
            return
        key, child, shape = found
        trail.append((node, key))
        node = child
    container, key = trail.pop()
    del container[key]
    for parent, parent_key in reversed(trail):
        if parent[parent_key]:
            break
        del parent[parent_key]


# --- managedFields --------------------------------------------------------------------------------


@dataclass
class _Entry:
    manager: str
    operation: str  # "Apply" or "Update"
    api_version: str
    subresource: str
    time: str | None
    paths: set[Path]

    @property
    def key(self) -> tuple[str, str, str]:
        return self.manager, self.operation, self.subresource

    def describe(self) -> str:
        """The owner as a conflict names it."""
        if self.operation == "Update":
            return f'"{self.manager}" using {self.api_version}'
        return f'"{self.manager}"'


class ApplyConflict(Exception):
    """An apply without force would change fields other managers own (the server's 409)."""

    def __init__(self, conflicts: list[tuple[_Entry, Path]]) -> None:
        self.causes = [
            {
                "reason": "FieldManagerConflict",
                "message": f"conflict with {entry.describe()}",
                "field": format_path(path),
            }
            for entry, path in conflicts
        ]
        if len(conflicts) == 1:
            entry, path = conflicts[0]
            message = f"conflict with {entry.describe()}: {format_path(path)}"
        else:
            lines = []
            for owner in sorted({entry.describe() for entry, _ in conflicts}):
                lines.append(f"conflicts with {owner}:")
                lines += [f"- {format_path(p)}" for e, p in conflicts if e.describe() == owner]
            message = "\n".join(lines)
        count = f"{len(conflicts)} conflict" + ("s" if len(conflicts) > 1 else "")
        self.message = f"Apply failed with {count}: {message}"
        super().__init__(self.message)


class FieldManager:
    """The managedFields of one kind's objects, and server-side apply onto them."""

    def __init__(
        self,
        shape: Shape,
        api_version: str,
        *,
        status_subresource: bool,
        clock: Callable[[], str],
    ) -> None:
        self.shape = shape
        self.api_version = api_version
        self.status_subresource = status_subresource
        self._clock = clock

    def _fields(self, obj: Mapping[str, Any] | None, subresource: str) -> dict[Path, Any]:
        """What managers can own of ``obj`` through the main resource or ``subresource``."""
        if obj is None:
            return {}
        if subresource == "status":
            view: JsonObj = {"status": obj["status"]} if "status" in obj else {}
        else:
            view = {
                key: value
                for key, value in obj.items()
                if key not in ("apiVersion", "kind", "metadata")
                and not (key == "status" and self.status_subresource)
            }
            meta = obj.get("metadata")
            if isinstance(meta, Mapping):
                owned = {k: v for k, v in meta.items() if k not in _SERVER_METADATA}
                if owned:
                    view["metadata"] = owned
        found: dict[Path, Any] = {}
        _collect(view, self.shape, (), found)
        return found

    def _decode(self, managed: Any) -> dict[tuple[str, str, str], _Entry] | None:
        if not isinstance(managed, list):
            return None
        entries: dict[tuple[str, str, str], _Entry] = {}
        for raw in managed:
            if not isinstance(raw, Mapping) or not isinstance(raw.get("fieldsV1") or {}, Mapping):
                return None
            operation = raw.get("operation")
            if not raw.get("manager") or operation not in ("Apply", "Update"):
                continue  # "[{}]" is how a client clears managedFields
            entry = _Entry(
                manager=str(raw["manager"]),
                operation=str(operation),
                api_version=str(raw.get("apiVersion") or self.api_version),
                subresource=str(raw.get("subresource") or ""),
                time=raw.get("time"),
                paths=paths_of(raw.get("fieldsV1") or {}),
            )
            if entry.key in entries:
                entries[entry.key].paths |= entry.paths
            else:
                entries[entry.key] = entry
        return entries

    @staticmethod
    def _encode(entries: Mapping[tuple[str, str, str], _Entry]) -> list[JsonObj]:
        encoded = []
        ordered = sorted(
            (entry for entry in entries.values() if entry.paths),
            key=lambda e: (e.operation, e.time or "", e.manager, e.subresource),
        )
        for entry in ordered:
            raw: JsonObj = {
                "manager": entry.manager,
                "operation": entry.operation,
                "apiVersion": entry.api_version,
            }
            if entry.time:
                raw["time"] = entry.time
            raw |= {"fieldsType": "FieldsV1", "fieldsV1": fields_v1(entry.paths)}
            if entry.subresource:
                raw["subresource"] = entry.subresource
            encoded.append(raw)
        return encoded

    def update(
        self,
        old: Mapping[str, Any] | None,
        new: Mapping[str, Any],
        manager: str,
        *,
        subresource: str = "",
        requested: Any = None,
    ) -> list[JsonObj]:
        """The managedFields once ``manager`` wrote ``new`` over ``old`` (None: a create).

        ``requested``: the managedFields the request carried (main resource only); they are the
        starting point when they differ from the stored ones and parse.
        """
        stored = (old or {}).get("metadata", {}).get("managedFields")
        entries = None
        if requested not in (None, [], stored):
            entries = self._decode(requested)
        if entries is None:
            entries = self._decode(stored) or {}
        added, removed, modified = _compare(
            self._fields(old, subresource), self._fields(new, subresource)
        )
        changed = added | modified
        key = (manager, "Update", subresource)
        for entry in entries.values():
            entry.paths -= removed if entry.key == key else (changed | removed)
        if changed:
            mine = entries.setdefault(
                key, _Entry(manager, "Update", self.api_version, subresource, None, set())
            )
            mine.paths |= changed
            mine.time = self._clock()
        return self._encode(entries)

    def apply(
        self,
        live: Mapping[str, Any] | None,
        config: Mapping[str, Any],
        manager: str,
        *,
        force: bool,
    ) -> tuple[JsonObj, list[JsonObj]]:
        """``config`` applied by ``manager`` over ``live`` (None: not there yet): the object to
        store and its managedFields. Raises :class:`ApplyConflict`."""
        entries = self._decode((live or {}).get("metadata", {}).get("managedFields")) or {}
        config = {k: v for k, v in config.items() if k != "status" or not self.status_subresource}
        merged: JsonObj = _merge(copy.deepcopy(dict(live or {})), config, self.shape)
        key = (manager, "Apply", "")
        previous = entries.get(key)
        last = previous.paths if previous is not None else set()
        mine = _Entry(manager, "Apply", self.api_version, "", None, set(self._fields(config, "")))
        if previous is not None:
            mine.time = previous.time
        entries[key] = mine
        owned = set().union(*(entry.paths for entry in entries.values()))
        # Fields applied last time and not now go, unless someone still owns them (or inside);
        # an item's key fields go with the item, never alone.
        for path in sorted(last - owned, key=len):
            if not _is_key_field(path) and not any(o[: len(path)] == path for o in owned):
                _remove(merged, path, self.shape)
        before, after = self._fields(live, ""), self._fields(merged, "")
        added, removed, modified = _compare(before, after)
        changed = added | modified
        others = [entry for entry in entries.values() if entry.key != key]
        conflicts = [(entry, path) for entry in others for path in sorted(entry.paths & changed)]
        if conflicts and not force:
            raise ApplyConflict(conflicts)
        for entry in others:
            entry.paths -= changed | removed
        if previous is None or before != after:
            mine.time = self._clock()
        return merged, self._encode(entries)
