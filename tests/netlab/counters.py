"""TCP/IP counters of one netns (/proc/net/snmp + /proc/net/netstat), to tell whether payload
crossed the TCP stack there (sk_msg redirection skips it; iptables interception does not)."""

from __future__ import annotations

from dataclasses import dataclass

from .netns import run_in_netns


@dataclass(frozen=True)
class NetCounters:
    """Counters keyed "Tcp.InSegs", "Tcp.OutSegs", "TcpExt.TCPOrigDataSent", "Ip.InReceives", ..."""

    values: dict[str, int]

    def __getitem__(self, key: str) -> int:
        return self.values[key]

    def __sub__(self, earlier: NetCounters) -> NetCounters:
        return NetCounters(
            {key: value - earlier.values.get(key, 0) for key, value in self.values.items()}
        )

    @property
    def tcp_segments(self) -> int:
        """Segments received plus sent."""
        return self.values["Tcp.InSegs"] + self.values["Tcp.OutSegs"]

    @property
    def tcp_data_segments_sent(self) -> int:
        """Segments that carried payload (TcpExt.TCPOrigDataSent, excludes retransmits)."""
        return self.values["TcpExt.TCPOrigDataSent"]


def parse_proc_net_counters(text: str) -> dict[str, int]:
    """Parse the header/value line pairs of /proc/net/snmp and /proc/net/netstat."""
    values: dict[str, int] = {}
    lines = [line for line in text.splitlines() if line.strip()]
    for header, data in zip(lines[::2], lines[1::2], strict=False):
        group, _, names = header.partition(":")
        data_group, _, numbers = data.partition(":")
        if group != data_group:
            raise ValueError(f"unaligned counter lines: {header!r} / {data!r}")
        for name, number in zip(names.split(), numbers.split(), strict=True):
            values[f"{group}.{name}"] = int(number)
    return values


def read_net_counters(netns: str) -> NetCounters:
    text = run_in_netns(netns, ["cat", "/proc/net/snmp", "/proc/net/netstat"])
    return NetCounters(parse_proc_net_counters(text))
