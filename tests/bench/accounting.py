"""CPU time from the processes' own accounting, and a client runner that reaps with rusage.

Long-running processes (Envoys, server apps) are read from ``/proc/<pid>/stat`` (utime + stime,
in clock ticks, every thread of the process) before and after a measurement. A load generator
runs to completion under :func:`run_client`, which reaps it with ``wait4`` and so gets its
whole CPU time (rusage, microsecond resolution) even though it has exited.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads, including exited ones), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # "pid (comm) state ...": comm may hold spaces and parentheses: split after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # stat fields 14 and 15
    return (utime + stime) / CLOCK_TICKS


def process_context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every live thread of a process."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):  # a thread that just exited
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split(":", 1)[1])
    return total


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    return {name: process_cpu_seconds(pid) for name, pid in pids.items()}


def switches_snapshot(pids: Mapping[str, int]) -> dict[str, int]:
    return {name: process_context_switches(pid) for name, pid in pids.items()}


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: round(after[name] - before[name], 6) for name in before}


@dataclass(frozen=True)
class MachineCpu:
    """/proc/stat's aggregate line: busy and total jiffies of the whole machine."""

    busy: int
    total: int

    @classmethod
    def read(cls) -> MachineCpu:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already inside user/nice
        return cls(busy=total - idle, total=total)

    def busy_seconds_since(self, earlier: MachineCpu) -> float:
        return (self.busy - earlier.busy) / CLOCK_TICKS


@dataclass(frozen=True)
class ClientRun:
    """A load generator that ran to completion: exit status, output, CPU time, wall time."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    cpu_seconds: float
    context_switches: int
    wall_seconds: float
    timed_out: bool


def run_client(argv: Sequence[str], *, timeout: float) -> ClientRun:
    """Run argv to completion (SIGKILL after `timeout` s) and reap it with wait4 for its rusage.

    The pod wrapper exec()s all the way down (sh -> ip netns exec -> [setpriv] -> tool), so the
    rusage is the tool's, plus the few milliseconds of the wrapper's start.
    """
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        started = time.monotonic()
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        timed_out = False
        try:
            status, rusage = _wait4(popen.pid, started + timeout)
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)  # our child, not yet reaped: the PID is ours
            _, status, rusage = os.wait4(popen.pid, 0)
        except BaseException:  # Ctrl-C while waiting: do not leave the tool running
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)
            os.wait4(popen.pid, 0)
            popen.returncode = -signal.SIGKILL
            raise
        wall = time.monotonic() - started
        popen.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return ClientRun(
            argv=list(argv),
            returncode=popen.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
            cpu_seconds=rusage.ru_utime + rusage.ru_stime,
            context_switches=rusage.ru_nvcsw + rusage.ru_nivcsw,
            wall_seconds=wall,
            timed_out=timed_out,
        )


def _wait4(pid: int, deadline: float) -> tuple[int, resource.struct_rusage]:
    interval = 0.005
    while True:
        reaped, status, rusage = os.wait4(pid, os.WNOHANG)
        if reaped == pid:
            return status, rusage
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still running at its deadline")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)
