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


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> argparse.Namespace:
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
        "--metrics-port",
        type=int,
        default=int(env("MESHACCEL_METRICS_PORT", str(DEFAULT_METRICS_PORT))),
        help="Prometheus metrics port (0 to disable)",
    )
    parser.add_argument(
        "--push-window",
        type=float,
        default=float(env("MESHACCEL_PUSH_WINDOW", "0.1")),
        help="seconds within which changes to a node's set go out as one push",
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=env("MESHACCEL_LOG_FORMAT", "json"),
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=env("MESHACCEL_LOG_LEVEL", "info"),
    )
    parser.add_argument(
        "--probe-interval",
        type=float,
        default=float(env("MESHACCEL_PROBE_INTERVAL", "15")),
        help="seconds between checks of each agent's boot id (a restarted agent gets its set)",
    )
    parser.add_argument(
        "--backoff-max",
        type=float,
        default=float(env("MESHACCEL_BACKOFF_MAX", "30")),
        help="longest wait, in seconds, between retries of a push an agent failed",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=int(env("MESHACCEL_PEERING_LIFETIME", "60")),
        help="seconds a silent replica is still counted alive (failover time)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.push_window <= 10:
        parser.error("--push-window must be between 0 and 10 seconds")
    if not 0.1 <= args.probe_interval <= 3600:
        parser.error("--probe-interval must be between 0.1 and 3600 seconds")
    if not 0.1 <= args.backoff_max <= 3600:
        parser.error("--backoff-max must be between 0.1 and 3600 seconds")
    if not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be a TCP port")
    return args


def operator_config(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespace=args.namespace,
        push_window=args.push_window,
        probe_interval=args.probe_interval,
        backoff_max=args.backoff_max,
        peering_lifetime=args.peering_lifetime,
    )
