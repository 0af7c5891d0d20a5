"""python -m tests.bench [--quick] [options]: see tests/bench/__init__.py and docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from .configs import CONFIGS_BY_KEY
from .runner import DEFAULT_RESULTS_DIR, FULL_PLAN, QUICK_PLAN, Plan, run
from .workloads import WORKLOADS_BY_NAME


def _names(text: str, known: dict[str, object], what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(unknown) or '(none)'}; known: {', '.join(known)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Side-by-side benchmark: no mesh, Istio iptables, the explicit ceiling, "
        "meshaccel (connect-time only; the default, sk_msg into sidecars; + sk_msg into apps). "
        "Needs root.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short smoke variant: fewer workloads, 2 rounds"
    )
    parser.add_argument("--rounds", type=int, help="rounds (default: 5, quick: 2)")
    parser.add_argument("--duration", type=float, help="seconds per measurement (10, quick: 2)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per measurement")
    parser.add_argument(
        "--workloads",
        type=lambda t: _names(t, dict(WORKLOADS_BY_NAME), "workload"),
        help="comma-separated: " + ", ".join(WORKLOADS_BY_NAME),
    )
    parser.add_argument(
        "--configs",
        type=lambda t: _names(t, dict(CONFIGS_BY_KEY), "configuration"),
        help="comma-separated keys: " + ", ".join(CONFIGS_BY_KEY),
    )
    parser.add_argument(
        "--profile-workloads",
        type=lambda t: _names(t, dict(WORKLOADS_BY_NAME), "workload"),
        help="workloads profiled after the rounds (perf + eBPF statistics)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profile pass")
    parser.add_argument("--no-chart", action="store_true", help="write no chart.png")
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help=f"where <timestamp>/ goes (default {DEFAULT_RESULTS_DIR})",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def plan_from(args: argparse.Namespace) -> Plan:
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    changes: dict[str, object] = {}
    for name in ("rounds", "duration", "warmup", "workloads", "configs"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.profile_workloads is not None:
        changes["profile_workloads"] = args.profile_workloads
    if args.no_profile:
        changes["profile_workloads"] = ()
    if args.no_chart:
        changes["chart"] = False
    plan = dataclasses.replace(plan, **changes)  # type: ignore[arg-type]
    if plan.rounds < 1 or not 0 < plan.duration <= 600 or not 0 <= plan.warmup <= 60:
        raise SystemExit("--rounds must be >= 1, --duration in (0, 600], --warmup in [0, 60]")
    if "duration" in changes and args.profile_workloads is None and not args.no_profile:
        plan = dataclasses.replace(plan, profile_duration=min(plan.profile_duration, plan.duration))
    return plan


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if os.geteuid() != 0:
        print("python -m tests.bench: run as root (netns, cgroups, eBPF)", file=sys.stderr)
        return 2
    plan = plan_from(args)
    # SIGTERM/SIGHUP unwind like Ctrl-C: every with-block removes what it made.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    try:
        directory = run(plan, args.results_dir)
    except KeyboardInterrupt:
        print("interrupted: everything the run made was removed", file=sys.stderr)
        return 130
    print((directory / "results.md").read_text())
    print(f"results: {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
