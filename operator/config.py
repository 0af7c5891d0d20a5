"""The operator's settings: command-line flags, each with a MESHACCEL_* environment variable.

The agents' image is one of them (``--agent-image``, set by the chart from its ``agent.image``
values), never a MeshAcceleration's: whoever may create a MeshAcceleration must not choose
what runs with the agents' privileges on every node (docs/security.md).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_NAMESPACE = "meshaccel-system"
DEFAULT_PEERING = "meshaccel"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 9090
# The agent of this release (the chart's appVersion; tests/chart checks they agree).
DEFAULT_AGENT_IMAGE = "ghcr.io/meshaccel/meshaccel-agent:0.1.0"

# An image reference as the container runtimes parse it (distribution's reference grammar,
# without IPv6 registries): [registry[:port]/]path[:tag][@sha256:digest]. The chart's
# values.schema.json holds the same rules for agent.image.repository, .tag and .digest.
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_REGISTRY = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_PATTERN = rf"(?:{_REGISTRY}(?::[0-9]+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
TAG_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
DIGEST_PATTERN = r"sha256:[a-f0-9]{64}"
_IMAGE = re.compile(
    rf"^(?P<repository>{REPOSITORY_PATTERN})(?::(?P<tag>{TAG_PATTERN}))?"
    rf"(?:@(?P<digest>{DIGEST_PATTERN}))?$"
)
# A Secret's name: a DNS subdomain.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def image_problem(reference: str) -> str | None:
    """Why ``reference`` cannot be the agents' image (a sentence), or None if it can.

    A tag or a digest is required and ``latest`` alone is refused: every node must run the
    same agent, and a moving tag pulled at different times is not the same agent.
    """
    found = _IMAGE.match(reference)
    if found is None:
        return (
            f"{reference!r} is not an image reference "
            "(REGISTRY/REPOSITORY:TAG or REGISTRY/REPOSITORY@sha256:DIGEST)"
        )
    if found["digest"]:
        return None
    if not found["tag"]:
        return (
            f"{reference!r} has no tag: name a version (for example {reference}:0.1.0) or a "
            "digest, so every node runs the same agent"
        )
    if found["tag"] == "latest":
        return f"{reference!r} uses the moving tag 'latest': pin a version or a digest"
    return None


@dataclass(frozen=True)
class AgentImage:
    """The agents' container image and the Secrets the kubelet pulls it with.

    The same for every MeshAcceleration: it comes from the operator's settings only.
    """

    reference: str = DEFAULT_AGENT_IMAGE  # repository:tag, repository@sha256:..., or both
    pull_secrets: tuple[str, ...] = ()  # Secret names in the agents' namespace


@dataclass(frozen=True)
class OperatorConfig:
    namespace: str  # where the agents (and the operator) run
    push_window: float = 0.1  # changes this close together go out as one push per node
    request_timeout: float = 10.0
    probe_interval: float = 15.0  # how often each agent's boot id is checked
    backoff_max: float = 30.0
    uninstall_timeout: float = 30.0
    # A node counts as failing (Degraded) once behind with an error for this long.
    failing_after: float = 10.0
    peering_lifetime: int = 60  # seconds without a word before a replica counts as dead
    lease_duration: float = 15.0  # the writer's Lease (leadership.py): a silent holder's time
    resync_interval: float = 300.0  # between full lists that drop what the watches missed
    agent_image: AgentImage = field(default_factory=AgentImage)  # the same for every resource


# (flag, environment variable, type, default, lowest, highest, help) of the numeric settings.
_NUMBERS: tuple[tuple[str, str, type[int] | type[float], str, float, float, str], ...] = (
    ("--metrics-port", "MESHACCEL_METRICS_PORT", int, str(DEFAULT_METRICS_PORT), 0, 65535,
     "Prometheus metrics port (0 to disable)"),
    ("--push-window", "MESHACCEL_PUSH_WINDOW", float, "0.1", 0, 10,
     "seconds within which changes to a node's set go out as one push"),
    ("--probe-interval", "MESHACCEL_PROBE_INTERVAL", float, "15", 0.1, 3600,
     "seconds between checks of each agent's boot id (a restarted agent gets its set)"),
    ("--backoff-max", "MESHACCEL_BACKOFF_MAX", float, "30", 0.1, 3600,
     "longest wait, in seconds, between retries of a push an agent failed"),
    ("--peering-lifetime", "MESHACCEL_PEERING_LIFETIME", int, "60", 1, 3600,
     "seconds a silent replica is still counted alive (failover time)"),
    ("--lease-duration", "MESHACCEL_LEASE_DURATION", float, "15", 1, 600,
     "seconds the writer's Lease outlives its last renewal (the holder stops at 2/3 of it)"),
    ("--resync-interval", "MESHACCEL_RESYNC_INTERVAL", float, "300", 1, 86400,
     "seconds between full lists of pods, namespaces and nodes that drop what the watches "
     "missed"),
)  # fmt: skip


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> argparse.Namespace:
    """Flags win over MESHACCEL_* variables, which win over the defaults; bad values exit 2."""
    env = environ.get
    parser = argparse.ArgumentParser(
        prog="meshaccel-operator",
        description="meshaccel's operator: MeshAccelerations reconciled into node agents.",
    )
    parser.add_argument(
        "--namespace",
        default=env("MESHACCEL_NAMESPACE", DEFAULT_NAMESPACE),
        help="namespace of the agents' DaemonSets (the operator's own)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default=env("MESHACCEL_PEERING", DEFAULT_PEERING),
        help="ClusterKopfPeering object the replicas coordinate through",
    )
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: a single replica, or a test"
    )
    parser.add_argument(
        "--liveness",
        default=env("MESHACCEL_LIVENESS", DEFAULT_LIVENESS),
        help="Kopf's health endpoint, as a URL to listen on ('' to disable)",
    )
    parser.add_argument(
        "--log-format", choices=("json", "text"), default=env("MESHACCEL_LOG_FORMAT", "json")
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=env("MESHACCEL_LOG_LEVEL", "info"),
    )
    parser.add_argument(
        "--agent-image",
        default=env("MESHACCEL_AGENT_IMAGE", DEFAULT_AGENT_IMAGE),
        help="the agents' container image, with a tag or a digest (REPOSITORY:TAG, "
        "REPOSITORY@sha256:DIGEST): every MeshAcceleration's agents run it",
    )
    parser.add_argument(
        "--agent-image-pull-secrets",
        default=env("MESHACCEL_AGENT_IMAGE_PULL_SECRETS", ""),
        help="comma-separated names of Secrets in --namespace to pull the agents' image with",
    )
    for flag, variable, kind, default, _, _, text in _NUMBERS:
        parser.add_argument(flag, type=kind, default=env(variable, default), help=text)
    args = parser.parse_args(argv)
    for flag, variable, _, _, lowest, highest, _ in _NUMBERS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if not lowest <= value <= highest:
            parser.error(f"{flag} ({variable}) must be between {lowest:g} and {highest:g}")
    problem = image_problem(args.agent_image)
    if problem:
        parser.error(f"--agent-image (MESHACCEL_AGENT_IMAGE): {problem}")
    args.agent_image_pull_secrets = _secret_names(args.agent_image_pull_secrets, parser)
    return args


def _secret_names(text: str, parser: argparse.ArgumentParser) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if len(name) > 253 or not _SECRET_NAME.match(name):
            parser.error(
                "--agent-image-pull-secrets (MESHACCEL_AGENT_IMAGE_PULL_SECRETS): "
                f"{name!r} is not a Secret name"
            )
    return tuple(dict.fromkeys(names))  # in order, each once


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespace=args.namespace,
        agent_image=AgentImage(args.agent_image, args.agent_image_pull_secrets),
        push_window=args.push_window,
        probe_interval=args.probe_interval,
        backoff_max=args.backoff_max,
        peering_lifetime=args.peering_lifetime,
        lease_duration=args.lease_duration,
        resync_interval=args.resync_interval,
    )
