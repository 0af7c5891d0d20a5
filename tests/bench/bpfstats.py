"""Per-program run time and count of the meshaccel programs (kernel.bpf_stats_enabled).

With the sysctl on, the kernel adds each program's run time (ns) and run count to its
bpf_prog_info; ``bpftool -j prog show id N`` reports them as run_time_ns / run_cnt. The
counters are cumulative since load, so measurements take deltas.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from meshaccel.agent import libbpf
from meshaccel.agent.datapath import CGROUP_HOOKS, SK_MSG_PROGRAM, PinLayout

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@contextmanager
def bpf_stats_enabled() -> Iterator[bool]:
    """Turn kernel.bpf_stats_enabled on for the block, then put back what was there.
    Yields False (and changes nothing) where the sysctl does not exist."""
    if not STATS_SYSCTL.exists():
        yield False
        return
    previous = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        yield True
    finally:
        STATS_SYSCTL.write_text(previous)


def program_ids(pins: PinLayout) -> dict[str, int]:
    """{program name: kernel id} of a loaded datapath, from its pinned links and program."""
    ids: dict[str, int] = {}
    for hook in CGROUP_HOOKS:
        with libbpf.Link.open_pinned(pins.link(hook.link)) as link:
            ids[hook.program] = link.info().prog_id
    with libbpf.Program.from_pin(pins.program(SK_MSG_PROGRAM)) as program:
        ids[SK_MSG_PROGRAM] = program.info().id
    return ids


@dataclass(frozen=True)
class ProgramStats:
    run_time_ns: int
    run_cnt: int


def read_program_stats(ids: Mapping[str, int]) -> dict[str, ProgramStats]:
    """run_time_ns / run_cnt of each program (0 where bpftool reports none)."""
    bpftool = shutil.which("bpftool")
    if bpftool is None or not ids:
        return {}
    stats: dict[str, ProgramStats] = {}
    for name, prog_id in ids.items():
        completed = subprocess.run(
            [bpftool, "-j", "prog", "show", "id", str(prog_id)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if completed.returncode != 0:
            continue
        info = json.loads(completed.stdout)
        stats[name] = ProgramStats(
            run_time_ns=int(info.get("run_time_ns", 0)), run_cnt=int(info.get("run_cnt", 0))
        )
    return stats


def stats_delta(
    before: Mapping[str, ProgramStats], after: Mapping[str, ProgramStats]
) -> dict[str, dict[str, float]]:
    """{program: {"run_cnt", "run_time_ns", "ns_per_run"}} over an interval."""
    delta: dict[str, dict[str, float]] = {}
    for name, end in after.items():
        start = before.get(name, ProgramStats(0, 0))
        count = end.run_cnt - start.run_cnt
        run_time = end.run_time_ns - start.run_time_ns
        delta[name] = {
            "run_cnt": count,
            "run_time_ns": run_time,
            "ns_per_run": round(run_time / count, 1) if count else 0.0,
        }
    return delta
