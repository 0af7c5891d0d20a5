"""Where the time goes: perf samples of the two sidecars and the server app, in buckets.

``perf record -e cpu-clock -F FREQ -a`` runs while one measurement does (system-wide: per-task
events would add perf's own work to every context switch, and a request makes several);
``perf report --pid`` then keeps the samples of Envoy A, Envoy B and the server app. Every
symbol falls in one bucket (netfilter, the eBPF/sockmap path, the TCP/IP stack, the scheduler,
syscalls, other kernel work, Envoy's own code, other user code). A sample is 1/FREQ s of CPU, so a
bucket's share converts to CPU microseconds per operation.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from .configs import Config
from .lab import BenchLab
from .measure import long_running_pids, measure, run_load
from .workloads import Workload

FREQ = 1999
TOP_SYMBOLS = 25

# First match wins; kernel symbols only (user code is bucketed by its DSO). Without a PMU
# (this VM), cpu-clock samples land where interrupts come back on: time spent with interrupts
# off (context switches, wakeups) shows up on finish_task_switch / *_unlock_irq*, hence the
# "scheduler/wakeup" bucket.
KERNEL_BUCKETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "netfilter",
        re.compile(
            r"^(nf_|__nf_|nft_|__nft_|ipt_|iptable_|ip_tables|nf_conntrack|nf_nat|nf_ct_|"
            r"__nf_conntrack|hash_conntrack|resolve_normal_ct|ipv4_conntrack|ipv4_confirm|"
            r"nf_hook|nf_confirm|xt_|ip_route_me_harder|br_nf)"
        ),
    ),
    (
        "ebpf/sockmap",
        re.compile(
            r"^(bpf_(?!lsm)|__bpf_|___bpf|sk_msg|__sk_msg|tcp_bpf|sk_psock|__sk_psock|"
            r"sock_map|sock_hash|__sock_map|__sock_hash|__cgroup_bpf|cgroup_bpf|__htab|htab_|"
            r"bpf_lru|__bpf_prog)"
        ),
    ),
    (
        "tcp/ip",
        re.compile(
            r"^(tcp_|__tcp|ip_|__ip_|ip4_|inet_|__inet|ipv4_|raw_|loopback_|__netif|netif_|"
            r"net_rx|process_backlog|__dev_|dev_|skb_|__skb|kfree_skb|__kfree_skb|"
            r"consume_skb|__alloc_skb|alloc_skb|napi|__napi|validate_xmit|neigh_|eth_|veth_|"
            r"br_|csum|__copy_skb|dst_|fib_|__fib|rt_|__mkroute|do_softirq|__do_softirq|"
            r"handle_softirqs|__local_bh|irq_exit|inet6_|ip6_|bbr_|cubictcp|sk_|__sk_|"
            r"sock_|__sock|lock_sock|release_sock|__release_sock|_copy_to_iter|"
            r"_copy_from_iter|copy_user|rep_movs|__check_object_size|__sys_sendto|"
            r"__sys_recvfrom|__x64_sys_sendto|__x64_sys_recvfrom|security_socket)"
        ),
    ),
    (
        "scheduler/wakeup",
        re.compile(
            r"^(finish_task_switch|__schedule|schedule|try_to_wake_up|ttwu_|wake_up|"
            r"__wake_up|autoremove_wake|default_wake|_raw_spin_unlock_irq|_raw_spin_lock|"
            r"_raw_spin_unlock|__raw_callee_save|native_queued_spin|pv_|enqueue_|dequeue_|"
            r"update_curr|update_load|pick_next|put_prev|set_next|select_task_rq|psi_|"
            r"hrtimer|__hrtimer|sched_|__sched|check_preempt|resched|prepare_task_switch|"
            r"switch_mm|__switch_to|native_sched_clock|read_tsc|ktime_get)"
        ),
    ),
    (
        "syscalls/epoll/vfs",
        re.compile(
            r"^(do_syscall|entry_SYSCALL|syscall_|x64_sys_call|__x64_sys_|ep_|do_epoll|"
            r"__ep_|epoll|vfs_|do_iter|import_iovec|__import_iovec|fdget|fput|__fget|"
            r"__fdget|rw_verify|__rseq|rseq_|exit_to_user|irqentry|__get_user|__put_user|"
            r"fsnotify|__fsnotify|security_file|apparmor|selinux|bpf_lsm|ksys_|__fget_light)"
        ),
    ),
)
USER_BUCKETS = {"envoy": "envoy (user)"}


def bucket_of(dso: str, symbol: str) -> str:
    """The bucket of one perf report line ("[k] name" or "[.] name")."""
    kind, _, name = symbol.partition(" ")
    if kind == "[k]" or dso.startswith("[kernel") or dso.startswith("[bpf_prog"):
        if name.startswith("bpf_prog_") or dso.startswith("[bpf_prog"):
            return "ebpf/sockmap"
        for bucket, pattern in KERNEL_BUCKETS:
            if pattern.match(name):
                return bucket
        return "other kernel"
    base = Path(dso).name
    return USER_BUCKETS.get(base, "other user")


def parse_report(text: str) -> list[tuple[int, str, str]]:
    """(samples, dso, symbol) rows of `perf report -q -F sample,dso,sym -t '|'`."""
    rows = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        rows.append((int(parts[0]), parts[1], "|".join(parts[2:])))
    return rows


def summarize(rows: list[tuple[int, str, str]], ops: float) -> dict[str, Any]:
    """Samples and CPU us per op, in total and per bucket, plus the top symbols."""
    total = sum(samples for samples, _, _ in rows)
    buckets: dict[str, int] = {}
    for samples, dso, symbol in rows:
        bucket = bucket_of(dso, symbol)
        buckets[bucket] = buckets.get(bucket, 0) + samples

    def us_per_op(samples: int) -> float | None:
        return round(samples / FREQ * 1e6 / ops, 2) if ops > 0 else None

    top = sorted(rows, reverse=True)[:TOP_SYMBOLS]
    return {
        "samples": total,
        "cpu_us_per_op": us_per_op(total),
        "buckets_us_per_op": {name: us_per_op(n) for name, n in sorted(buckets.items())},
        "buckets_share": {
            name: round(n / total, 4) if total else 0.0 for name, n in sorted(buckets.items())
        },
        "top": [
            {"samples": n, "share": round(n / total, 4) if total else 0.0, "dso": d, "symbol": s}
            for n, d, s in top
        ],
    }


def perf_report(perf: str, data: Path, pid: int) -> str:
    completed = subprocess.run(
        [
            perf,
            "report",
            "-i",
            str(data),
            "--stdio",
            "--no-children",
            "-q",
            "--pid",
            str(pid),
            "--sort",
            "dso,sym",
            "-F",
            "sample,dso,sym",
            "-t",
            "|",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return completed.stdout


def profile_one(
    lab: BenchLab,
    workload: Workload,
    config: Config,
    *,
    duration: float,
    warmup: float,
    out_dir: Path,
) -> dict[str, Any]:
    """Apply `config`, warm up, then one measurement under perf. Returns the measurement record
    with a "profile" entry: per process, samples per bucket as CPU us per op."""
    perf = lab.tools.perf
    lab.apply(config)
    if warmup > 0:
        run_load(lab, workload, config, warmup)
    pids = long_running_pids(lab, workload)
    record: dict[str, Any]
    if perf is None:
        record = measure(lab, workload, config, duration=duration, warmup=0)
        record["profile"] = None
        return record
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{workload.name}--{config.key}"
    data = out_dir / f"{stem}.perf.data"
    with (out_dir / f"{stem}.perf.log").open("wb") as perf_log:
        recorder = subprocess.Popen(
            [
                perf,
                "record",
                "-e",
                "cpu-clock",
                "-F",
                str(FREQ),
                "-a",  # per-CPU, not per-task: no perf work at every context switch
                "-o",
                str(data),
            ],
            stdin=subprocess.DEVNULL,
            stdout=perf_log,
            stderr=perf_log,
            start_new_session=True,
        )
        try:
            time.sleep(0.5)  # let perf attach before the load starts
            record = measure(lab, workload, config, duration=duration, warmup=0)
        finally:
            recorder.send_signal(signal.SIGINT)
            try:
                recorder.wait(60)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait(10)
    profiles: dict[str, Any] = {}
    try:
        for role, pid in pids.items():
            text = perf_report(perf, data, pid)
            (out_dir / f"{stem}--{role}.txt").write_text(text)
            profiles[role] = summarize(parse_report(text), float(record["ops"]))
    finally:
        with contextlib.suppress(FileNotFoundError):
            data.unlink()  # tens of MB; the per-process reports stay
    record["profile"] = profiles
    return record
