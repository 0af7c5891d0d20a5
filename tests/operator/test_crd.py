"""The CRD: generated from the models, committed up to date, structural, and agreeing with them."""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshaccel.operator import crd
from meshaccel.operator.models import ConditionType, MeshAccelerationSpec, MeshAccelerationStatus
from meshaccel.operator.status import Rollout, compute_status, now_rfc3339
from tests.operator.k8s_validation import CrdSchema
from tests.operator.objects import acceleration
from tests.operator.test_status import large_cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / crd.CRD_FILE


def openapi() -> dict[str, Any]:
    document = yaml.safe_load(CRD_PATH.read_text())
    schema: dict[str, Any] = document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_committed_crd_is_up_to_date(capsys) -> None:
    assert crd.main(["--check", "--output-dir", str(CRD_PATH.parent)]) == 0, (
        "crds/ is out of date: run `python -m meshaccel.operator.crd`\n" + capsys.readouterr().out
    )


def test_check_notices_a_stale_file(tmp_path: Path) -> None:
    (tmp_path / crd.CRD_FILE).write_text(CRD_PATH.read_text().replace("istio", "isteo", 1))
    assert crd.main(["--check", "--output-dir", str(tmp_path)]) == 1


def _walk(node: Any, path: str = "") -> list[str]:
    """Violations of the structural-schema rules apiextensions/v1 enforces."""
    if not isinstance(node, dict):
        return []
    problems = []
    for forbidden in ("$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "title"):
        if forbidden in node:
            problems.append(f"{path}: {forbidden}")
    typed = (
        "type" in node
        or node.get("x-kubernetes-int-or-string")
        or node.get("x-kubernetes-preserve-unknown-fields")
    )
    if not typed:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for name, sub in node.get("properties", {}).items():
        problems += _walk(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        problems += _walk(node.get(key), f"{path}[{key}]")
    return problems


def test_schema_is_structural() -> None:
    assert _walk(openapi()) == []


def test_status_is_fully_described() -> None:
    """Nothing the operator writes to .status may be pruned: every field is in the schema."""
    status = openapi()["properties"]["status"]
    assert "x-kubernetes-preserve-unknown-fields" not in status
    assert set(status["properties"]) == set(MeshAccelerationStatus.model_fields)


def test_printer_columns_and_names() -> None:
    document = yaml.safe_load(CRD_PATH.read_text())
    version = document["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:1] == ["Mode"] and columns[-1] == "Age"
    selected = columns.index("Selected")
    assert columns[selected + 1] == "Accelerated", "pods selected beside pods accelerated"
    assert version["subresources"] == {"status": {}}
    assert document["spec"]["scope"] == "Cluster"
    assert document["spec"]["names"]["shortNames"] == ["meshaccel", "ma"]


def test_server_defaults_equal_the_models_defaults() -> None:
    """A minimal resource, defaulted by the schema, is what the models default it to."""
    obj = acceleration()
    CrdSchema(openapi()).default(obj)
    from_models = MeshAccelerationSpec.model_validate(acceleration()["spec"]).model_dump(
        mode="json", exclude_none=True
    )
    assert obj["spec"] == from_models


def test_the_agent_image_is_retired_not_defaulted() -> None:
    """Issue 12: the image is the operator's. The API server must write none into new resources
    (the 0.1 CRD's default is in every resource created then), and must keep showing an old
    value to the operator: a field missing from the schema is pruned, unseen, on every read."""
    agent = openapi()["properties"]["spec"]["properties"]["agent"]
    image = agent["properties"]["image"]
    assert "default" not in image and "image" not in agent["default"]
    assert image["nullable"] is True and image["description"].startswith("retired:")


def test_the_agents_resources_default_to_the_operators() -> None:
    """Issue 13: a resource that sets no spec.agent.resources gets the operator's default
    (Helm agent.resources), so the CRD must not write one in: the API server would store it
    and the operator's default would never apply."""
    agent = openapi()["properties"]["spec"]["properties"]["agent"]
    resources = agent["properties"]["resources"]
    assert "default" not in resources and "resources" not in agent["default"]
    assert resources["nullable"] is True


GOOD: list[tuple[str, dict[str, Any]]] = [
    ("minimal", {}),
    ("every mode", {"mode": "kuma"}),
    (
        "full selectors",
        {
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/part-of": "shop"},
                "matchExpressions": [
                    {"key": "tier", "operator": "NotIn", "values": ["batch"]},
                    {"key": "legacy", "operator": "DoesNotExist"},
                ],
            }
        },
    ),
    (
        "agent settings",
        {
            "agent": {
                "imagePullPolicy": "Always",
                "port": 19474,
                "nodeSelector": {"kubernetes.io/os": "linux"},
                "tolerations": [
                    {
                        "key": "dedicated",
                        "operator": "Equal",
                        "value": "mesh",
                        "effect": "NoSchedule",
                    }
                ],
                "resources": {"requests": {"cpu": 1, "memory": "128Mi"}},
                "priorityClassName": "system-node-critical",
            }
        },
    ),
    ("datapath", {"datapath": {"skMsgRedirect": False, "maxPods": 4096}}),
    (
        "sk_msg budget and the apps that take it",
        {
            "datapath": {
                "skMsgRedirectBudget": 8 << 20,
                "skMsgToAppsSelector": {
                    "matchExpressions": [
                        {"key": "reads-with", "operator": "In", "values": ["recv"]}
                    ]
                },
            }
        },
    ),
    ("an explicitly unset apps selector", {"datapath": {"skMsgToAppsSelector": None}}),
    # Retired, kept in the schema so the API server does not drop it unseen (the operator
    # refuses a value: tests/operator/test_checks.py).
    ("the retired agent image", {"agent": {"image": "registry.example/meshaccel-agent:0.1.0"}}),
    ("exclusions", {"exclusions": {"outboundPorts": [5432], "outboundCIDRs": ["169.254.0.0/16"]}}),
    (
        "IPv6 exclusions",
        {"exclusions": {"outboundCIDRs": ["fd00:ec2::254/128", "::/0", "::ffff:10.0.0.0/104"]}},
    ),
]

BAD: list[tuple[str, dict[str, Any], str]] = [
    ("unknown mode", {"mode": "cilium"}, "spec.mode"),
    ("port zero", {"agent": {"port": 0}}, "spec.agent.port"),
    ("port as text", {"agent": {"port": "9474"}}, "spec.agent.port"),
    ("unknown field", {"accelerate": True}, "spec"),
    (
        "unknown selector operator",
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Contains"}]}},
        "operator",
    ),
    ("bad label value", {"podSelector": {"matchLabels": {"a": "no spaces"}}}, "matchLabels"),
    ("tolerations not a list", {"agent": {"tolerations": {"operator": "Exists"}}}, "tolerations"),
    ("maxPods too big", {"datapath": {"maxPods": 10**6}}, "maxPods"),
    ("budget below 64 KiB", {"datapath": {"skMsgRedirectBudget": 65535}}, "skMsgRedirectBudget"),
    ("budget above 64 MiB", {"datapath": {"skMsgRedirectBudget": 1 << 30}}, "skMsgRedirectBudget"),
    ("the retired cluster-wide switch", {"datapath": {"skMsgToApps": True}}, "skMsgToApps"),
    (
        "an apps selector that is no selector",
        {"datapath": {"skMsgToAppsSelector": {"app": "web"}}},
        "skMsgToAppsSelector",
    ),
    ("not a CIDR", {"exclusions": {"outboundCIDRs": ["everything"]}}, "outboundCIDRs"),
    (
        "an IPv6 address without a prefix",
        {"exclusions": {"outboundCIDRs": ["fd00::1"]}},
        "outboundCIDRs",
    ),
    ("hex without a colon", {"exclusions": {"outboundCIDRs": ["fd00/8"]}}, "outboundCIDRs"),
    (
        "longer than any IPv6 CIDR",
        {"exclusions": {"outboundCIDRs": ["0000:0000:0000:0000:0000:0000:0000:0000:0000:0/128"]}},
        "outboundCIDRs",
    ),
]


@pytest.mark.parametrize(("reason", "spec"), GOOD, ids=[g[0] for g in GOOD])
def test_valid_resources_pass_both_schema_and_models(reason: str, spec: dict[str, Any]) -> None:
    obj = acceleration(spec={"namespaceSelector": {}, **spec})
    schema = CrdSchema(openapi())
    defaulted = copy.deepcopy(obj)
    schema.default(defaulted)
    assert schema.validate(defaulted) is None, reason
    MeshAccelerationSpec.model_validate_json(json.dumps(obj["spec"]), strict=True)


@pytest.mark.parametrize(("reason", "spec", "field"), BAD, ids=[b[0] for b in BAD])
def test_invalid_resources_are_rejected_by_the_schema(
    reason: str, spec: dict[str, Any], field: str
) -> None:
    obj = acceleration(spec={"namespaceSelector": {}, **spec})
    schema = CrdSchema(openapi())
    schema.default(obj)
    error = schema.validate(obj)
    assert error is not None, reason
    assert field in str(error), (reason, str(error))
    with pytest.raises(ValueError):  # the models agree (strict, as from JSON)
        MeshAccelerationSpec.model_validate_json(json.dumps(obj["spec"]), strict=True)


def test_missing_namespace_selector_is_rejected() -> None:
    obj = acceleration(spec={"mode": "istio"})
    schema = CrdSchema(openapi())
    schema.default(obj)
    error = schema.validate(obj)
    assert error is not None and "namespaceSelector" in str(error)


# -- the status: what the operator writes, the schema takes ----------------------------------


def _with_status(status: MeshAccelerationStatus) -> dict[str, Any]:
    obj = acceleration(spec={"namespaceSelector": {}})
    obj["status"] = status.model_dump(mode="json", exclude_none=True)
    return obj


def test_the_status_of_a_large_cluster_is_valid_and_its_lists_are_capped() -> None:
    """What compute_status writes for 500 nodes (problems of every kind) passes the CRD's
    schema; one list entry more than the caps is refused by it."""
    accel, nodes = large_cluster()
    ds = Rollout(name="meshaccel-system/meshaccel-agent-default", desired=500, ready=500)
    status, _ = compute_status(
        accel, nodes, ds, generation=1, previous=[], clock_now=100.0, behind_grace=10
    )
    schema = CrdSchema(openapi())
    obj = _with_status(status)
    assert obj["status"]["nodes"] and obj["status"]["problems"]
    assert schema.validate(obj) is None
    for key in ("nodes", "problems"):
        longer = copy.deepcopy(obj)
        longer["status"][key].append(longer["status"][key][0])
        error = schema.validate(longer)
        assert error is not None and error.path == f"status.{key}", key


def test_condition_times_are_date_times_and_the_operator_writes_them_so() -> None:
    condition = openapi()["properties"]["status"]["properties"]["conditions"]["items"]
    assert condition["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert condition["properties"]["type"]["enum"] == [str(kind) for kind in ConditionType]
    written = now_rfc3339()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", written), written
    assert datetime.fromisoformat(written).tzinfo is not None
