"""Processes started inside a pod: in the pod's netns AND its cgroup, stoppable by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# The wrapper joins the cgroup itself (no preexec_fn: it is unsafe with threads), then every later
# step exec()s, so the PID Popen reports is the PID of the final program:
#   sh (writes $$ to cgroup.procs) -> ip netns exec -> [setpriv] -> program
_JOIN_CGROUP_AND_EXEC = 'echo $$ > "$0" || exit 97; exec "$@"'
CGROUP_JOIN_FAILED = 97


@dataclass(frozen=True)
class RunAs:
    """Another identity, through setpriv (the executable's path must be reachable for it)."""

    uid: int
    gid: int

    def argv(self) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--"]


SIDECAR_IDENTITY = RunAs(uid=1337, gid=1337)


def pod_command(
    netns: str, cgroup_dir: Path, argv: Sequence[str], run_as: RunAs | None = None
) -> list[str]:
    """The argv that runs `argv` in the netns and the cgroup (optionally as another uid/gid)."""
    identity = run_as.argv() if run_as is not None else []
    return [
        "/bin/sh",
        "-c",
        _JOIN_CGROUP_AND_EXEC,
        str(cgroup_dir / "cgroup.procs"),
        "ip",
        "netns",
        "exec",
        netns,
        *identity,
        *argv,
    ]


class PodProcess:
    """A long-running process in a pod. Output goes to files; stop() signals only this PID."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        log_dir: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self.pid = self._popen.pid

    def is_running(self) -> bool:
        return self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def wait(self, timeout: float) -> int:
        return self._popen.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        # While Popen has not reaped it, the PID cannot have been reused by another process.
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL and reap. Returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            return self._popen.wait(timeout=timeout)

    def stdout(self) -> str:
        return _read_text(self.stdout_path)

    def stderr(self) -> str:
        return _read_text(self.stderr_path)

    def describe(self, tail_chars: int = 2000) -> str:
        return (
            f"{self.name} pid={self.pid} rc={self.returncode}\n"
            f"--- stdout ---\n{self.stdout()[-tail_chars:]}\n"
            f"--- stderr ---\n{self.stderr()[-tail_chars:]}"
        )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
