"""The ``meshaccel`` console script (also ``kubectl-meshaccel``, a kubectl plugin).

Exit codes: 0 the answer is good (every resource Ready, every node passed its check), 1 it is
not, 2 no answer (the API refused or could not be reached, or a usage error).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import IO

from meshaccel.cli.agents import Agents, find_agents, run_agent
from meshaccel.cli.check import CheckReport, check_nodes, render_check
from meshaccel.cli.kube import AccessError, Cluster, JsonObj, login
from meshaccel.cli.output import Report, Style, printable, printable_text, wants_colour
from meshaccel.cli.pods import PodsReport, make_resource, notes, pod_rows, render_pods
from meshaccel.cli.status import StatusReport, render_status, status_report
from meshaccel.cli.versions import VersionReport, render_version, version_report
from meshaccel.contract.version import VERSION

EXIT_OK, EXIT_NOT_OK, EXIT_NO_ANSWER = 0, 1, 2


def _common(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: the options may come before or after the command, neither overrides the other.
    parser.add_argument("--kubeconfig", default=argparse.SUPPRESS, help="kubeconfig file")
    parser.add_argument("--context", default=argparse.SUPPRESS, help="kubeconfig context")
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="for each API request and each command run in an agent (default 30)",
    )


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="text or json"
    )


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="meshaccel",
        description="Is meshaccel working? Reads the cluster through the Kubernetes API with "
        "your kubeconfig (docs/operations.md).",
    )
    main.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    _common(main)
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = commands.add_parser(
        "status", help="each MeshAcceleration: conditions, nodes, pods, problems, versions"
    )
    status.add_argument("name", nargs="?", help="one MeshAcceleration (default: all)")
    pods = commands.add_parser("pods", help="each selected pod: accelerated, or why not")
    scope = pods.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="this namespace (default: the context's)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    commands.add_parser("check", help="the agents' preflight on every node")
    version = commands.add_parser("version", help="client, operator and agent versions")
    version.add_argument(
        "--client", action="store_true", help="only this client's version (no API request)"
    )
    for command in (status, pods, commands.choices["check"], version):
        _common(command)
        _output(command)
    return main


def _accelerations(cluster: Cluster, name: str | None = None) -> list[JsonObj]:
    if name is None:
        return cluster.accelerations()
    found = cluster.acceleration(name)
    if found is None:
        raise AccessError(f'MeshAcceleration "{name}" not found', status=404)
    return [found]


def _agents(cluster: Cluster, report: StatusReport) -> list[Agents]:
    return [find_agents(cluster, status) for status in report.accelerations]


def run_status(cluster: Cluster, args: argparse.Namespace) -> tuple[Report, list[str], int]:
    report = status_report(_accelerations(cluster, args.name), VERSION)
    code = EXIT_OK if report.all_ready else EXIT_NOT_OK
    return report, render_status(printable(report), args.style), code


def run_pods(cluster: Cluster, args: argparse.Namespace) -> tuple[Report, list[str], int]:
    accelerations = _accelerations(cluster)
    statuses = status_report(accelerations, VERSION)
    by_name = {s.name: s for s in statuses.accelerations}
    agents = {a.resource: a for a in _agents(cluster, statuses)}
    resources = []
    for acceleration in accelerations:
        name = str((acceleration.get("metadata") or {}).get("name"))
        found = agents[name]
        resources.append(make_resource(acceleration, by_name[name], found.pods, found.error))
    if args.all_namespaces:
        scope, namespace = "all namespaces", None
        listed = cluster.namespaces()
    else:
        namespace = args.namespace or cluster.login.namespace
        scope = f"namespace {namespace}"
        one = cluster.namespace(namespace)
        if one is None:
            raise AccessError(f'namespace "{namespace}" not found', status=404)
        listed = [one]
    labels = {
        str((ns.get("metadata") or {}).get("name")): (ns.get("metadata") or {}).get("labels") or {}
        for ns in listed
    }
    rows = pod_rows(
        resources,
        labels,
        cluster.pods(namespace),
        {a.namespace for a in agents.values() if a.namespace},
    )
    report = PodsReport(scope=scope, pods=rows, notes=notes(resources))
    return report, render_pods(printable(report), args.style), EXIT_OK


def run_check(cluster: Cluster, args: argparse.Namespace) -> tuple[Report, list[str], int]:
    statuses = status_report(cluster.accelerations(), VERSION)
    agents = _agents(cluster, statuses)
    found = [f"MeshAcceleration {a.resource}: {a.error}" for a in agents if a.error]
    try:
        nodes: list[JsonObj] | None = cluster.nodes()
    except AccessError as err:
        nodes = None
        found.append(f"{err}: only nodes with an agent pod are checked")
    checks = check_nodes(agents, nodes, partial(run_agent, cluster))
    report = CheckReport(nodes=checks, notes=found)
    code = EXIT_OK if report.ok else EXIT_NOT_OK
    return report, render_check(printable(report), args.style), code


def run_version(cluster: Cluster, args: argparse.Namespace) -> tuple[Report, list[str], int]:
    statuses = status_report(cluster.accelerations(), VERSION)
    agents = _agents(cluster, statuses)
    namespaces = sorted({a.namespace for a in agents if a.namespace})
    report = version_report(
        cluster, VERSION, statuses.accelerations, agents, namespaces, partial(run_agent, cluster)
    )
    return report, render_version(printable(report), args.style), EXIT_OK


COMMANDS: dict[str, Callable[[Cluster, argparse.Namespace], tuple[Report, list[str], int]]] = {
    "status": run_status,
    "pods": run_pods,
    "check": run_check,
    "version": run_version,
}


def main(
    argv: Sequence[str] | None = None, stdout: IO[str] | None = None, stderr: IO[str] | None = None
) -> int:
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = parser().parse_args(argv)
    args.style = Style(args.output == "text" and wants_colour(out))
    if args.command == "version" and args.client:
        client_only = VersionReport(client=VERSION)
        print(client_only.to_json() if args.output == "json" else f"Client: {VERSION}", file=out)
        return EXIT_OK
    try:
        credentials = login(getattr(args, "kubeconfig", None), getattr(args, "context", None))
        with Cluster(credentials, timeout=getattr(args, "request_timeout", 30.0)) as cluster:
            report, lines, code = COMMANDS[args.command](cluster, args)
    except AccessError as error:
        print(f"meshaccel: {printable_text(str(error))}", file=err)  # the API's words
        return EXIT_NO_ANSWER
    except KeyboardInterrupt:
        return 130
    print(report.to_json() if args.output == "json" else "\n".join(lines), file=out)
    return code


if __name__ == "__main__":
    sys.exit(main())
