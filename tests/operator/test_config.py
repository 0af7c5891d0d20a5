"""The operator's settings: flags over MESHACCEL_* over defaults, bad values refused."""

from __future__ import annotations

import pytest

from meshaccel.operator.config import (
    DEFAULT_AGENT_IMAGE,
    AgentImage,
    image_problem,
    operator_config,
    parse_args,
)


def test_defaults() -> None:
    config = operator_config(parse_args([], environ={}))
    assert (config.namespace, config.push_window, config.probe_interval) == (
        "meshaccel-system",
        0.1,
        15.0,
    )
    assert (config.backoff_max, config.peering_lifetime) == (30.0, 60)
    assert config.agent_image == AgentImage(DEFAULT_AGENT_IMAGE, ())


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
