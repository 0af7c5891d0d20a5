"""The operator's settings: flags over MESHACCEL_* over defaults, bad values refused."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from meshaccel.operator.config import (
    DEFAULT_AGENT_IMAGE,
    AgentImage,
    AgentPod,
    image_problem,
    operator_config,
    parse_args,
    quantity,
)
from meshaccel.operator.models import LEGACY_DEFAULT_AGENT_RESOURCES


def test_defaults() -> None:
    config = operator_config(parse_args([], environ={}))
    assert (config.namespace, config.push_window, config.probe_interval) == (
        "meshaccel-system",
        0.1,
        15.0,
    )
    assert (config.backoff_max, config.peering_lifetime) == (30.0, 60)
    assert config.agent_image == AgentImage(DEFAULT_AGENT_IMAGE, ())
    assert config.agent_pod == AgentPod()
    # The agents' default resources are what the 0.1 CRD defaulted every resource to.
    assert config.agent_pod.resources.model_dump() == LEGACY_DEFAULT_AGENT_RESOURCES


def test_environment_then_flags() -> None:
    environ = {"MESHACCEL_NAMESPACE": "mesh", "MESHACCEL_PUSH_WINDOW": "0.5"}
    assert operator_config(parse_args([], environ=environ)).push_window == 0.5
    flagged = parse_args(["--push-window", "0.2", "--namespace", "x"], environ=environ)
    assert (flagged.namespace, flagged.push_window) == ("x", 0.2)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--push-window", "11"], {}, "--push-window (MESHACCEL_PUSH_WINDOW) must be between"),
        ([], {"MESHACCEL_BACKOFF_MAX": "0"}, "--backoff-max (MESHACCEL_BACKOFF_MAX)"),
        ([], {"MESHACCEL_METRICS_PORT": "http"}, "invalid int value"),
        (["--log-level", "loud"], {}, "invalid choice"),
        (["--peering", "p", "--standalone"], {}, "not allowed with argument"),
        (
            [],
            {"MESHACCEL_AGENT_IMAGE": "registry.example/agent"},
            "--agent-image (MESHACCEL_AGENT_IMAGE): 'registry.example/agent' has no tag",
        ),
        (["--agent-image", "agent:latest"], {}, "uses the moving tag 'latest'"),
        (["--agent-image", "agent: 1"], {}, "is not an image reference"),
        (
            [],
            {"MESHACCEL_AGENT_IMAGE_PULL_SECRETS": "good,Bad_Name"},
            "--agent-image-pull-secrets (MESHACCEL_AGENT_IMAGE_PULL_SECRETS): 'Bad_Name' is not",
        ),
    ],
)
def test_bad_values_exit_2_naming_the_setting(argv, environ, message, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ=environ)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_agent_image_and_pull_secrets() -> None:
    """The agents' image is the operator's setting (issue 12): environment, then flags."""
    digest = "registry.example:5000/mirror/meshaccel-agent@sha256:" + "a" * 64
    environ = {
        "MESHACCEL_AGENT_IMAGE": digest,
        "MESHACCEL_AGENT_IMAGE_PULL_SECRETS": " mirror , second,mirror,",
    }
    config = operator_config(parse_args([], environ=environ))
    assert config.agent_image == AgentImage(digest, ("mirror", "second"))
    flagged = parse_args(
        ["--agent-image", "r.example/agent:0.2.0", "--agent-image-pull-secrets", ""],
        environ=environ,
    )
    assert operator_config(flagged).agent_image == AgentImage("r.example/agent:0.2.0", ())


@pytest.mark.parametrize(
    ("reference", "accepted"),
    [
        ("ghcr.io/meshaccel/meshaccel-agent:0.1.0", True),
        ("meshaccel-agent:0.1.0", True),
        ("localhost:5000/meshaccel-agent:1", True),
        ("registry.example/a/b/c__d-e.f:v1.2.3-rc.1", True),
        ("registry.example/agent@sha256:" + "0" * 64, True),
        ("registry.example/agent:latest@sha256:" + "0" * 64, True),
        ("registry.example/agent", False),
        ("registry.example/agent:latest", False),
        ("registry.example/Agent:1", False),
        ("registry.example/agent:1 ", False),
        ("registry.example/agent@sha256:abc", False),
        ("'registry.example/agent:1'", False),
        ("", False),
    ],
)
def test_image_references(reference: str, accepted: bool) -> None:
    assert (image_problem(reference) is None) is accepted, image_problem(reference)


# -- the agents' pod beyond the image (issue 13): JSON settings, checked before anything runs --

AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["mesh"]}]}
            ]
        }
    }
}


def test_agent_pod_settings_from_the_environment_then_flags() -> None:
    environ = {
        "MESHACCEL_AGENT_POD_ANNOTATIONS": json.dumps({"example.com/team": "mesh"}),
        "MESHACCEL_AGENT_POD_LABELS": json.dumps({"cost-center": "mesh"}),
        "MESHACCEL_AGENT_NODE_SELECTOR": json.dumps({"pool": "mesh"}),
        "MESHACCEL_AGENT_AFFINITY": json.dumps(AFFINITY),
        "MESHACCEL_AGENT_PRIORITY_CLASS": "mesh-agents",
        "MESHACCEL_AGENT_RESOURCES": json.dumps({"requests": {"cpu": "100m"}}),
    }
    pod = operator_config(parse_args([], environ=environ)).agent_pod
    assert pod.annotations == {"example.com/team": "mesh"}
    assert pod.labels == {"cost-center": "mesh"}
    assert pod.node_selector == {"pool": "mesh"}
    assert pod.affinity is not None
    assert pod.affinity.model_dump(mode="json", exclude_defaults=True) == AFFINITY
    assert pod.priority_class_name == "mesh-agents"
    assert pod.resources.model_dump() == {"requests": {"cpu": "100m"}, "limits": {}}
    flagged = parse_args(["--agent-node-selector", "{}", "--agent-priority-class", ""], environ)
    assert (flagged.agent_pod.node_selector, flagged.agent_pod.priority_class_name) == ({}, "")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--agent-pod-annotations", "{'a': 1}"],
            "--agent-pod-annotations (MESHACCEL_AGENT_POD_ANNOTATIONS): not JSON",
        ),
        (["--agent-node-selector", '["pool"]'], "a JSON object is needed"),
        (
            ["--agent-pod-labels", '{"meshaccel.io/acceleration": "other"}'],
            "--agent-pod-labels (MESHACCEL_AGENT_POD_LABELS): "
            "['meshaccel.io/acceleration'] are the operator's own labels",
        ),
        (
            ["--agent-pod-labels", '{"app.kubernetes.io/name": "x"}'],
            "are the operator's own labels",
        ),
        (
            ["--agent-pod-annotations", '{"meshaccel.io/config-hash": "0"}'],
            "are the operator's own annotations",
        ),
        (
            ["--agent-pod-labels", '{"team": "no spaces"}'],
            "(MESHACCEL_AGENT_POD_LABELS): team: String should match",
        ),
        (
            ["--agent-affinity", '{"nodeAffinity": {"required": {}}}'],
            "--agent-affinity (MESHACCEL_AGENT_AFFINITY): nodeAffinity.required: Extra inputs",
        ),
        (
            [
                "--agent-affinity",
                json.dumps(
                    {
                        "podAntiAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {"weight": 0, "podAffinityTerm": {"topologyKey": "zone"}}
                            ]
                        }
                    }
                ),
            ],
            "preferredDuringSchedulingIgnoredDuringExecution.0.weight",
        ),
        (
            ["--agent-resources", '{"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}'],
            "the memory request (2Gi) exceeds its limit (1Gi)",
        ),
        (["--agent-resources", '{"requests": {"cpu": "lots"}}'], "'lots' is not a quantity"),
        (
            ["--agent-resources", '{"request": {"cpu": 1}}'],
            "(MESHACCEL_AGENT_RESOURCES): request: Extra inputs",
        ),
        (["--agent-priority-class", "Mesh Agents"], "'Mesh Agents' is not a PriorityClass name"),
        (
            ["--agent-pod-annotations", json.dumps({"example.com/big": "x" * (256 * 1024)})],
            "more than the API server takes",
        ),
    ],
)
def test_bad_agent_pod_settings_exit_2_naming_the_setting(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv, environ={})
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50m", Decimal("0.05")),
        ("96Mi", Decimal(96 * 2**20)),
        ("1.5", Decimal("1.5")),
        ("1e3", Decimal(1000)),
        ("2k", Decimal(2000)),
        (4, Decimal(4)),
        ("1Gi", Decimal(2**30)),
    ],
)
def test_quantities(text: str | int, value: Decimal) -> None:
    assert quantity(text) == value
