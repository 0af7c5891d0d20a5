"""The node's TCP memory, as the kernel counts it for every TCP socket (/proc/net/sockstat).

This is what sk_msg without a bound exhausts: bytes redirected into a socket are charged to it,
and when the node's total reaches ``net.ipv4.tcp_mem``'s pressure threshold every TCP socket on
the node is squeezed. The datapath tests sample it during a transfer and compare paths.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType
from typing import Self

SOCKSTAT = Path("/proc/net/sockstat")
TCP_MEM = Path("/proc/sys/net/ipv4/tcp_mem")


def tcp_memory_pages(sockstat: str | None = None) -> int:
    """Pages of TCP memory in use on the node: the ``mem`` field of sockstat's ``TCP:`` line."""
    text = SOCKSTAT.read_text() if sockstat is None else sockstat
    for line in text.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            return int(dict(zip(fields[::2], fields[1::2], strict=True))["mem"])
    raise ValueError("no TCP line in sockstat")


def tcp_memory_pressure_pages() -> int:
    """``net.ipv4.tcp_mem``'s second value: from here on, the kernel squeezes every TCP socket."""
    return int(TCP_MEM.read_text().split()[1])


class TcpMemoryPeak:
    """Samples :func:`tcp_memory_pages` on a thread while in use; ``peak`` and ``before`` after.

    ``grown`` is the peak above what the node held before: the transfer's own cost.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="tcp-memory", daemon=True)
        self.before = 0
        self.peak = 0

    @property
    def grown(self) -> int:
        return max(0, self.peak - self.before)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, tcp_memory_pages())

    def __enter__(self) -> Self:
        self.before = self.peak = tcp_memory_pages()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tcp_memory_pages())
