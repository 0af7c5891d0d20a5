"""Find (and, for crashed earlier runs, remove) what netlab left behind."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .cgroups import TEST_CGROUP_PREFIX, find_cgroup2_mount, kill_cgroup_tree, remove_cgroup_tree
from .netns import delete_netns, list_netns

_OWNED_NAME = re.compile(r"^meshaccel-(?:test-)?(\d+)-(\d+)(?:-|$)")


def _node_cgroup_name(token: str) -> str:
    pid, number = token.rsplit("-", 2)[1:]
    return f"{TEST_CGROUP_PREFIX}{pid}-{number}"


def find_leftovers(token: str) -> list[str]:
    """Everything that still exists for node `token` ("meshaccel-<pid>-<n>"): netns, cgroups, temp
    dirs, and processes whose command line mentions the token (all pod processes do: their logs and
    configs live under the node's temp dir)."""
    found = [f"netns {name}" for name in list_netns() if name.startswith(f"{token}-")]
    cgroup = find_cgroup2_mount() / _node_cgroup_name(token)
    if cgroup.exists():
        found.append(f"cgroup {cgroup}")
    found += [f"temp dir {path}" for path in Path(tempfile.gettempdir()).glob(f"{token}-*")]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if f"{token}-" in cmdline:
                found.append(f"process {proc.name}: {cmdline.strip()[:200]}")
    return found


def _owner_is_dead(name: str) -> bool:
    match = _OWNED_NAME.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_leftovers() -> list[str]:
    """Remove netlab netns, cgroups and temp dirs whose creating test process no longer exists
    (a run that was SIGKILLed). Names created by live processes are never touched."""
    removed: list[str] = []
    cgroup_root = find_cgroup2_mount()
    for directory in cgroup_root.glob(f"{TEST_CGROUP_PREFIX}*"):
        if directory.is_dir() and _owner_is_dead(directory.name):
            kill_cgroup_tree(directory, timeout=10.0)
            remove_cgroup_tree(directory)
            removed.append(f"cgroup {directory}")
    for name in list_netns():
        if _owner_is_dead(name):
            delete_netns(name)
            removed.append(f"netns {name}")
    for path in Path(tempfile.gettempdir()).glob("meshaccel-*"):
        if path.is_dir() and _owner_is_dead(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"temp dir {path}")
    return removed
