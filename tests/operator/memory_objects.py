"""An in-memory :class:`meshaccel.operator.credentials.ObjectStore` for the operator's CA
Secret and ConfigMap, with the API server's compare-and-swap."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshaccel.operator.credentials import SecretConflict


@dataclass
class MemoryObjects:
    """Secrets or ConfigMaps as the API server keeps them: resourceVersions, 409 on a stale
    patch, merge patches of ``data`` and annotations."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    writes: int = 0

    async def read(self, name: str) -> dict[str, Any] | None:
        found = self.objects.get(name)
        return copy.deepcopy(found) if found is not None else None

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if name in self.objects:
            raise SecretConflict(f"{name} exists")
        return self._store(name, copy.deepcopy(dict(obj)))

    async def patch(self, name: str, version: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        current = self.objects[name]
        if current["metadata"]["resourceVersion"] != version:
            raise SecretConflict(f"{name} moved on")
        merged = copy.deepcopy(current)
        for key, value in patch.get("data", {}).items():
            if value is None:
                merged["data"].pop(key, None)
            else:
                merged["data"][key] = value
        for key, value in patch.get("metadata", {}).get("annotations", {}).items():
            annotations = merged["metadata"].setdefault("annotations", {})
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        return self._store(name, merged)

    def _store(self, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self.versions))
        self.objects[name] = obj
        self.writes += 1
        return copy.deepcopy(obj)

    def annotate(self, name: str, key: str, value: str) -> None:
        obj = self.objects[name]
        obj["metadata"].setdefault("annotations", {})[key] = value
        obj["metadata"]["resourceVersion"] = str(next(self.versions))
