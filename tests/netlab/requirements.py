"""What netlab needs from the machine: skip locally, fail with CI=true (tests.requirements)."""

from __future__ import annotations

import os
import shutil

from ..requirements import require
from .cgroups import find_cgroup2_mount
from .envoy import find_envoy_binary

REQUIRED_TOOLS = (
    "ip",
    "iptables-nft-restore",
    "iptables-nft-save",
    "nft",
    "setpriv",
    "sysctl",
    "cat",
)


def missing_netlab_requirements(
    tools: tuple[str, ...] = REQUIRED_TOOLS, *, need_envoy: bool = True
) -> list[str]:
    """Every reason this machine cannot run netlab (empty when it can)."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("must run as root (netns, cgroups, iptables)")
    problems += [f"tool {tool!r} not on PATH" for tool in tools if shutil.which(tool) is None]
    try:
        find_cgroup2_mount()
    except OSError as exc:
        problems.append(f"no cgroup2 mount: {exc}")
    if need_envoy:
        try:
            find_envoy_binary()
        except FileNotFoundError as exc:
            problems.append(str(exc))
    return problems


def require_netlab(tools: tuple[str, ...] = REQUIRED_TOOLS, *, need_envoy: bool = True) -> None:
    """Skip the test (pytest.fail when CI=true) listing every missing netlab requirement."""
    __tracebackhide__ = True
    problems = missing_netlab_requirements(tools, need_envoy=need_envoy)
    require(not problems, "netlab cannot run here: " + "; ".join(problems))
