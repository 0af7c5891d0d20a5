"""The operator's settings: command-line flags, each with a MESHACCEL_* environment variable."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

DEFAULT_NAMESPACE = "meshaccel-system"
DEFAULT_PEERING = "meshaccel"
DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"
DEFAULT_METRICS_PORT = 9090


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
    for flag, variable, kind, default, _, _, text in _NUMBERS:
        parser.add_argument(flag, type=kind, default=env(variable, default), help=text)
    args = parser.parse_args(argv)
    for flag, variable, _, _, lowest, highest, _ in _NUMBERS:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if not lowest <= value <= highest:
            parser.error(f"{flag} ({variable}) must be between {lowest:g} and {highest:g}")
    return args


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespace=args.namespace,
        push_window=args.push_window,
        probe_interval=args.probe_interval,
        backoff_max=args.backoff_max,
        peering_lifetime=args.peering_lifetime,
    )
