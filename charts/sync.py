"""Keeps the chart in step with the repository's CRDs.

    python charts/sync.py            copy crds/*.yaml into the chart, refresh values.schema.json
    python charts/sync.py --check    exit 1 (saying what differs) if either is out of date

Two things are derived from ``crds/`` and committed:

* ``charts/meshaccel/crds/``: byte-for-byte copies of the top-level ``crds/*.yaml`` (Helm
  installs a chart's CRDs only from the chart's own folder).
* the ``defaultAcceleration`` part of ``charts/meshaccel/values.schema.json``: the
  MeshAcceleration CRD's ``spec`` schema, turned into the JSON Schema that Helm checks values
  against (unknown keys refused, ``nullable`` and int-or-string spelt as JSON Schema types,
  no defaults: keys left out of the values take the CRD's defaults on the API server).

tests/chart/ runs the check, so CI fails when a CRD changes and the chart does not.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRDS = ROOT / "crds"
CHART = ROOT / "charts" / "meshaccel"
CHART_CRDS = CHART / "crds"
SCHEMA = CHART / "values.schema.json"
MESHACCEL_CRD = CRDS / "meshaccel.io_meshaccelerations.yaml"

# defaultAcceleration keys that are the chart's own, not the resource's spec.
CHART_ONLY_KEYS = {
    "enabled": {
        "type": "boolean",
        "description": "Create the MeshAcceleration.",
    },
    "name": {
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        "description": "Its name (MeshAccelerations are cluster-scoped).",
    },
}

JsonSchema = dict[str, Any]


def crd_spec_schema(crd_file: Path = MESHACCEL_CRD) -> JsonSchema:
    """The openAPIV3Schema of the MeshAcceleration CRD's storage version, ``spec`` only."""
    crd = yaml.safe_load(crd_file.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    spec: JsonSchema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def to_values_schema(node: Any) -> Any:
    """A structural CRD schema node as a JSON Schema for Helm values."""
    if isinstance(node, list):
        return [to_values_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: JsonSchema = {}
    for key, value in node.items():
        if key in ("default", "nullable") or key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_values_schema(sub) for name, sub in value.items()}
        else:
            out[key] = to_values_schema(value)
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    elif node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in out and "additionalProperties" not in out:
        # The API server prunes unknown fields silently; at install time say so instead.
        out["additionalProperties"] = False
    return out


def default_acceleration_schema(spec: JsonSchema) -> JsonSchema:
    """values.schema.json's ``defaultAcceleration``: the chart's own keys plus the spec's."""
    converted = to_values_schema(spec)
    properties = {**copy.deepcopy(CHART_ONLY_KEYS), **converted["properties"]}
    return {
        "type": "object",
        "description": "An optional MeshAcceleration made by the chart; every key except "
        "enabled and name is the resource's spec (generated from the CRD by charts/sync.py).",
        "additionalProperties": False,
        "properties": properties,
        "required": ["enabled"],
    }


def expected_schema(current: JsonSchema) -> JsonSchema:
    updated = copy.deepcopy(current)
    updated["properties"]["defaultAcceleration"] = default_acceleration_schema(crd_spec_schema())
    return updated


def dump_schema(schema: JsonSchema) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def crd_differences() -> list[str]:
    """What differs between crds/ and the chart's crds/ (empty when in step)."""
    top = {p.name: p.read_bytes() for p in sorted(CRDS.glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted(CHART_CRDS.glob("*.yaml"))}
    problems = [f"{name}: missing from charts/meshaccel/crds/" for name in top.keys() - chart]
    problems += [
        f"{name}: in charts/meshaccel/crds/ but not in crds/" for name in chart.keys() - top
    ]
    problems += [
        f"{name}: charts/meshaccel/crds/{name} differs from crds/{name}"
        for name in sorted(top.keys() & chart.keys())
        if top[name] != chart[name]
    ]
    return sorted(problems)


def schema_difference() -> str | None:
    current = json.loads(SCHEMA.read_text())
    if dump_schema(expected_schema(current)) == SCHEMA.read_text():
        return None
    return "charts/meshaccel/values.schema.json: defaultAcceleration is out of step with the CRD"


def write() -> None:
    CHART_CRDS.mkdir(parents=True, exist_ok=True)
    wanted = {p.name for p in CRDS.glob("*.yaml")}
    for stale in CHART_CRDS.glob("*.yaml"):
        if stale.name not in wanted:
            stale.unlink()
    for source in sorted(CRDS.glob("*.yaml")):
        (CHART_CRDS / source.name).write_bytes(source.read_bytes())
    SCHEMA.write_text(dump_schema(expected_schema(json.loads(SCHEMA.read_text()))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report what is out of date")
    args = parser.parse_args(argv)
    if not args.check:
        write()
        return 0
    problems = crd_differences()
    if (schema := schema_difference()) is not None:
        problems.append(schema)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run: python charts/sync.py", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
