"""Node TCP memory: the pages the kernel has charged to TCP sockets, sampled during a measurement.

sk_msg delivery queues bytes on the receiving socket, where they count as TCP memory like any
other received data. A receiver that falls behind once grew that without limit, up to
``net.ipv4.tcp_mem``'s pressure threshold, where every TCP socket of the node is squeezed. The
redirect budget bounds it; the benchmark and the datapath tests show that it does with this module.

``/proc/net/sockstat``'s ``TCP: ... mem N`` is the node-wide count (``tcp_memory_allocated``,
in pages), whichever network namespace reads it. A :class:`PeakSampler` reads it about 20 times a
second in a background thread while a measurement runs and keeps the value before it and the
peak; ``net.ipv4.tcp_mem`` (min, pressure, max, in pages) is read once per run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

SOCKSTAT = Path("/proc/net/sockstat")
TCP_MEM_SYSCTL = Path("/proc/sys/net/ipv4/tcp_mem")
# 20 Hz: a queue that grows without limit does so for seconds, and reading sockstat this often
# costs the harness well under a millisecond of CPU per second.
SAMPLE_INTERVAL_S = 0.05


def parse_sockstat_tcp_mem(text: str) -> int | None:
    """The ``mem`` field of sockstat's ``TCP:`` line (pages), or None if it has none."""
    for line in text.splitlines():
        protocol, _, fields = line.partition(":")
        if protocol.strip() != "TCP":
            continue
        words = fields.split()
        values = dict(zip(words[::2], words[1::2], strict=False))
        mem = values.get("mem", "")
        return int(mem) if mem.isdigit() else None
    return None


def read_tcp_mem_pages(path: Path = SOCKSTAT) -> int | None:
    """The node's TCP memory now, in pages; None where sockstat cannot be read."""
    try:
        return parse_sockstat_tcp_mem(path.read_text())
    except OSError:
        return None


@dataclass(frozen=True)
class TcpMemLimits:
    """``net.ipv4.tcp_mem``, in pages: above ``pressure`` TCP shrinks every socket's buffers."""

    min_pages: int
    pressure_pages: int
    max_pages: int


def parse_tcp_mem_sysctl(text: str) -> TcpMemLimits | None:
    words = text.split()
    if len(words) != 3 or not all(word.isdigit() for word in words):
        return None
    low, pressure, high = (int(word) for word in words)
    return TcpMemLimits(low, pressure, high)


def read_tcp_mem_limits(path: Path = TCP_MEM_SYSCTL) -> TcpMemLimits | None:
    try:
        return parse_tcp_mem_sysctl(path.read_text())
    except OSError:
        return None


class PeakSampler:
    """The first value and the highest one of ``read`` between :meth:`start` and :meth:`stop`.

    A thread calls :meth:`sample` every ``interval`` seconds; ``start`` and ``stop`` take a
    reading themselves, so ``before`` is the value just before the measurement and the peak
    covers its end even when the thread has not run yet. Readings of None are ignored.
    """

    def __init__(
        self,
        read: Callable[[], int | None] = read_tcp_mem_pages,
        interval: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self._read = read
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.before: int | None = None
        self.peak: int | None = None
        self.samples = 0

    @property
    def grown(self) -> int:
        """How far the peak rose above ``before``: what the measured work itself cost."""
        return max(0, (self.peak or 0) - (self.before or 0))

    def sample(self) -> None:
        value = self._read()
        if value is None:
            return
        with self._lock:
            self.samples += 1
            self.peak = value if self.peak is None else max(self.peak, value)

    def start(self) -> None:
        self.before = self._read()
        if self.before is not None:
            with self._lock:
                self.samples += 1
                self.peak = self.before
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tcp-mem-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
