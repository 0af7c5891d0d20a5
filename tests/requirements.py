"""What a test needs from the machine, checked in one place.

Outside CI a missing requirement skips the test with the reason. With ``CI=true`` nothing may be
skipped: the same call fails the test, so a CI machine that lacks something cannot pass by
running less.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from meshaccel.agent import mounts

BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def require(condition: bool, reason: str) -> None:
    """Skip (locally) or fail (in CI) the calling test unless ``condition`` holds."""
    __tracebackhide__ = True  # report the caller's line, not this one
    if condition:
        return
    if in_ci():
        pytest.fail(f"requirement not met on a CI machine: {reason}", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    __tracebackhide__ = True
    require(os.geteuid() == 0, "needs root (run as root: loads eBPF, creates netns and cgroups)")


def require_btf() -> None:
    __tracebackhide__ = True
    require(BTF_VMLINUX.is_file(), f"needs a kernel with BTF ({BTF_VMLINUX} is missing)")


def cgroup2_mount() -> Path | None:
    """Where cgroup v2 is mounted, from /proc/self/mountinfo (not always /sys/fs/cgroup)."""
    return mounts.find_cgroup2_mount()


def require_cgroup2() -> Path:
    __tracebackhide__ = True
    mount = cgroup2_mount()
    require(mount is not None, "needs a cgroup v2 mount (none in /proc/self/mountinfo)")
    assert mount is not None
    return mount


def require_tool(name: str) -> str:
    """Return the path of executable ``name``, or skip/fail when it is not on PATH."""
    __tracebackhide__ = True
    path = shutil.which(name)
    require(path is not None, f"needs the {name!r} executable on PATH")
    assert path is not None
    return path


def require_kernel() -> None:
    """Everything a ``@pytest.mark.kernel`` test needs."""
    __tracebackhide__ = True
    require_root()
    require_btf()
    require_cgroup2()
