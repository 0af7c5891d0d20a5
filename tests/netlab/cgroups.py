"""cgroup v2 helpers: find the cgroup2 mount and own a test cgroup with one child per pod."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from meshaccel.agent import mounts

from .commands import DEFAULT_COMMAND_TIMEOUT_S

TEST_CGROUP_PREFIX = "meshaccel-test-"


def find_cgroup2_mount(mountinfo: Path = Path("/proc/self/mountinfo")) -> Path:
    """The mount point of the cgroup v2 hierarchy (pure or hybrid layout); raises if none."""
    mount = mounts.find_cgroup2_mount(mountinfo)
    if mount is None:
        raise FileNotFoundError(f"no cgroup2 mount in {mountinfo}")
    return mount


def cgroup_id(path: Path) -> int:
    """The cgroup id of a cgroup2 directory: its inode number (bpf_get_current_cgroup_id)."""
    return os.stat(path).st_ino


def cgroup_pids(path: Path) -> list[int]:
    """Processes currently in exactly this cgroup (not descendants)."""
    try:
        text = (path / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(token) for token in text.split()]


def cgroup_is_populated(path: Path) -> bool:
    """True while any process lives in this cgroup or one of its descendants."""
    try:
        events = (path / "cgroup.events").read_text()
    except FileNotFoundError:
        return False
    return any(line == "populated 1" for line in events.splitlines())


class TestCgroup:
    """A cgroup `<cgroup2>/meshaccel-test-<pid>-<n>/` with child cgroups (one per pod).

    The eBPF loader attaches its programs to `path`; a pod's processes live in `child(pod)`.
    Only processes this harness started are ever placed here, so removal may kill whatever it finds.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, name: str, *, root: Path | None = None) -> None:
        if not name.startswith(TEST_CGROUP_PREFIX):
            raise ValueError(f"test cgroup names must start with {TEST_CGROUP_PREFIX!r}: {name!r}")
        self.root = root if root is not None else find_cgroup2_mount()
        self.path = self.root / name
        self._created = False

    @property
    def id(self) -> int:
        return cgroup_id(self.path)

    def create(self) -> TestCgroup:
        self.path.mkdir(mode=0o755)
        self._created = True
        return self

    def child(self, relative: str) -> Path:
        """Create (mkdir -p) a descendant such as "pod-a" or "burstable/pod-a"; return its path."""
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or ".." in parts:
            raise ValueError(
                f"child cgroup must be a relative path below {self.path}: {relative!r}"
            )
        current = self.path
        for part in parts:
            current = current / part
            if not current.exists():
                current.mkdir(mode=0o755)
        return current

    def remove(self, *, timeout: float = DEFAULT_COMMAND_TIMEOUT_S) -> None:
        """Kill what is left in our cgroups (only our processes) and rmdir them bottom-up."""
        if not self._created or not self.path.exists():
            return
        kill_cgroup_tree(self.path, timeout=timeout)
        remove_cgroup_tree(self.path)
        self._created = False

    def __enter__(self) -> TestCgroup:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def kill_cgroup_tree(path: Path, *, timeout: float) -> None:
    """SIGKILL every process in `path` and below (cgroup.kill); wait until it is unpopulated."""
    if not cgroup_is_populated(path):
        return
    kill_file = path / "cgroup.kill"
    if kill_file.exists():
        kill_file.write_text("1")
    else:  # kernels before 5.14: kill pid by pid, bottom-up
        for directory in sorted(_walk_dirs(path), key=lambda p: len(p.parts), reverse=True):
            for pid in cgroup_pids(directory):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
    deadline = time.monotonic() + timeout
    while cgroup_is_populated(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"cgroup {path} still populated {timeout}s after cgroup.kill")
        time.sleep(0.02)


def remove_cgroup_tree(path: Path) -> None:
    """rmdir a cgroup and its descendants, deepest first."""
    for directory in sorted(_walk_dirs(path), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(FileNotFoundError):
            directory.rmdir()


def _walk_dirs(path: Path) -> list[Path]:
    found = [path]
    for dirpath, dirnames, _ in os.walk(path):
        found.extend(Path(dirpath) / d for d in dirnames)
    return found
