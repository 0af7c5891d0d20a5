"""values.yaml and values.schema.json say the same thing (no helm needed)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import yaml

from meshaccel.operator.config import Affinity
from meshaccel.operator.crd import openapi_schema
from tests.chart.helm import CHART
from tests.chart.sync import load_sync

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def _subschema(schema: dict[str, Any], key: str | int) -> dict[str, Any] | None:
    """The schema that describes ``key`` of a value that ``schema`` describes, if any."""
    if isinstance(key, int):
        items = schema.get("items")
        return items if isinstance(items, dict) else None
    properties = schema.get("properties", {})
    if key in properties:
        sub: dict[str, Any] = properties[key]
        return sub
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        return extra
    if schema.get("type") == "object" and extra is None and not properties:
        return {}  # a free-form object (affinity, tolerations' items): described as a whole
    return None


def _undescribed(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    found: list[str] = []
    children: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    for key, child in children:
        sub = _subschema(schema, key)
        where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}".lstrip(".")
        if sub is None:
            found.append(where)
        else:
            found += _undescribed(child, sub, where)
    return found


def test_every_value_is_described_in_the_schema() -> None:
    assert _undescribed(VALUES, SCHEMA, "") == []


def test_every_schema_property_has_a_description() -> None:
    missing: list[str] = []

    def walk(schema: dict[str, Any], path: str) -> None:
        for name, sub in schema.get("properties", {}).items():
            where = f"{path}.{name}".lstrip(".")
            # Generated parts: the spec's nested fields come from the CRD, which describes the
            # main ones only; the agents' affinity from the operator's model (core/v1's fields).
            generated = where.startswith(("defaultAcceleration.", "agent.affinity."))
            if "description" not in sub and not generated:
                missing.append(where)
            walk(sub, where)

    walk(SCHEMA, "")
    assert missing == []


def test_every_top_level_value_has_a_schema_entry_and_back() -> None:
    assert set(VALUES) == set(SCHEMA["properties"])


def test_global_stays_open_for_parent_charts() -> None:
    """Helm hands a parent chart's globals to this one: unknown keys there are not errors."""
    assert "additionalProperties" not in SCHEMA["properties"]["global"]
    jsonschema.validate(
        {**VALUES, "global": {"imageRegistry": "", "storageClass": "x"}},
        SCHEMA,
        cls=jsonschema.Draft7Validator,
    )


def test_agent_affinity_is_the_operators_model() -> None:
    """agent.affinity is checked as the operator checks it (operator/config.py Affinity): the
    schema is generated from that model, as the CRD's is from the resource's."""
    sync = load_sync()
    wanted = sync.to_values_schema(openapi_schema(Affinity))
    ours = dict(SCHEMA["properties"]["agent"]["properties"]["affinity"])
    ours.pop("description")
    wanted.pop("description")
    assert ours == wanted, "regenerate agent.affinity from operator/config.py Affinity"


def test_values_yaml_passes_its_own_schema() -> None:
    jsonschema.validate(VALUES, SCHEMA, cls=jsonschema.Draft7Validator)


def test_default_acceleration_schema_is_the_crd_spec() -> None:
    """Keys and rules of defaultAcceleration come from the CRD (charts/sync.py writes them)."""
    sync = load_sync()
    assert sync.schema_difference() is None, "run: python charts/sync.py"
    spec = sync.crd_spec_schema()
    ours = SCHEMA["properties"]["defaultAcceleration"]["properties"]
    assert set(ours) == set(spec["properties"]) | {"enabled", "name"}
    for key in set(VALUES["defaultAcceleration"]) - {"enabled", "name"}:
        assert key in spec["properties"], f"defaultAcceleration.{key} is not a spec field"
