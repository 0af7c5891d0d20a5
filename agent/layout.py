"""The datapath's ABI seen from Python: mirrors of ``bpf/include/meshaccel.h``.

Fields the C side types as ``__be16``/``__be32`` are byte arrays here, so
network byte order is explicit at every use: build them with :func:`be16`
and :func:`ipv4`, read them back with :func:`port_of` and :func:`ip_of`.
``struct ip_address`` (either family, 16 bytes, IPv4 stored IPv4-mapped) is
built with :func:`address` and read with :func:`address_of`.
``tests/unit/test_layout.py`` checks every structure against the compiled
objects' BTF and every enum against the header.
"""

from __future__ import annotations

import ctypes
import enum
import socket
from ipaddress import IPv4Address, IPv6Address, ip_address

Be16 = ctypes.c_ubyte * 2
Be32 = ctypes.c_ubyte * 4
#: ``struct ip_address``: an IPv6 address, or an IPv4 one IPv4-mapped (``::ffff:a.b.c.d``).
Address = ctypes.c_ubyte * 16
NetworkBytes = ctypes.Array[ctypes.c_ubyte]  # a Be16, Be32 or Address field

#: The address family of a ``pod_cidr_key``: Linux's numbers (host order in the key).
AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)


def be16(port: int) -> NetworkBytes:
    return Be16(*port.to_bytes(2, "big"))


def ipv4(address: IPv4Address | str) -> NetworkBytes:
    return Be32(*IPv4Address(address).packed)


def port_of(field: NetworkBytes) -> int:
    return int.from_bytes(bytes(field), "big")


def ip_of(field: NetworkBytes) -> IPv4Address:
    return IPv4Address(bytes(field))


_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def address_bytes(ip: IPv4Address | IPv6Address) -> bytes:
    """The 16 bytes of ``struct ip_address``: an IPv4 address IPv4-mapped, as the kernel shows
    an IPv4 peer of a dual-stack socket (and as every map keyed by an address holds it)."""
    if isinstance(ip, IPv4Address):
        return _MAPPED_PREFIX + ip.packed
    return ip.packed


def address(ip: IPv4Address | IPv6Address | str) -> NetworkBytes:
    """A ``struct ip_address`` field for ``ip`` (a str of either family)."""
    return Address(*address_bytes(ip_address(ip) if isinstance(ip, str) else ip))


def address_of(field: NetworkBytes | bytes) -> IPv4Address | IPv6Address:
    """The address a ``struct ip_address`` holds: IPv4 if it is IPv4-mapped, else IPv6."""
    raw = bytes(field)
    if raw[:12] == _MAPPED_PREFIX:
        return IPv4Address(raw[12:])
    return IPv6Address(raw)


class IpAddress(ctypes.Structure):
    """``struct ip_address`` itself, for the layout check; fields use :data:`Address`."""

    _fields_ = [("word", Be32 * 4)]


class HandshakeKey(ctypes.Structure):
    _fields_ = [("client_seq", ctypes.c_uint32), ("server_seq", ctypes.c_uint32)]


class SockTuple(ctypes.Structure):
    _fields_ = [
        ("netns_cookie", ctypes.c_uint64),
        ("handshake", HandshakeKey),
        ("local_ip", Address),
        ("remote_ip", Address),
        ("local_port", Be16),
        ("remote_port", Be16),
        ("pad", ctypes.c_uint32),
    ]


class ConnectionFlags(enum.IntFlag):
    CONNECTION_REWRITTEN = 1 << 0
    CONNECTION_CLIENT_TAKES_MSG = 1 << 1
    CONNECTION_SERVER_TAKES_MSG = 1 << 2
    CONNECTION_DNS = 1 << 3
    CONNECTION_CLIENT_IS_APP = 1 << 4
    CONNECTION_SERVER_IS_APP = 1 << 5


class Connection(ctypes.Structure):
    _fields_ = [
        ("original_ip", Address),
        ("client_ip", Address),
        ("original_port", Be16),
        ("flags", ctypes.c_uint16),
    ]


class SocketState(ctypes.Structure):
    _fields_ = [("conn", Connection), ("flags", ctypes.c_uint32), ("handshake", HandshakeKey)]


class SocketFlags(enum.IntFlag):
    SOCKET_SENDS_TCP = 1 << 0
    SOCKET_SENDS_REDIRECTED = 1 << 1
    SOCKET_IN_SENDERS = 1 << 2
    SOCKET_IN_RECEIVERS = 1 << 3
    SOCKET_ACCEPTED = 1 << 4
    SOCKET_SENT = 1 << 5
    SOCKET_SENT_AGAIN = 1 << 6


class ReceiveQueue(ctypes.Structure):
    _fields_ = [("redirected", ctypes.c_uint64), ("consumed", ctypes.c_uint64)]


class AppReuse(ctypes.Structure):
    _fields_ = [
        ("connections", ctypes.c_uint32),
        ("reused", ctypes.c_uint32),
        ("skipped", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("last_connect_ns", ctypes.c_uint64),
    ]


class AppReuseLimits(enum.IntEnum):
    """How a pod learns whether its application connections are reused (``struct app_reuse``)."""

    APP_REUSE_SAMPLES = 16
    APP_REUSE_WINDOW = 64
    APP_REUSE_PROBE = 8
    APP_REUSE_PAUSE_NS = 1_000_000_000


class PodFlags(enum.IntFlag):
    POD_OUTBOUND_INCLUDE_ALL = 1 << 0
    POD_SK_MSG_TO_APP = 1 << 1
    POD_SIDECAR_UID_ONLY = 1 << 2
    POD_DNS_CAPTURE = 1 << 3


class PodInfo(ctypes.Structure):
    _fields_ = [
        ("ip", Be32),  # 0: no IPv4 address
        ("sidecar_uid", ctypes.c_uint32),
        ("outbound_port", Be16),
        ("inbound_port", Be16),
        ("flags", ctypes.c_uint16),
        ("dns_port", Be16),  # 0 unless POD_DNS_CAPTURE
        ("ipv6", Address),  # all zero: no IPv6 address
    ]


class TrafficDirection(enum.IntEnum):
    DIRECTION_OUTBOUND = 0
    DIRECTION_INBOUND = 1


class PodPortKey(ctypes.Structure):
    _fields_ = [
        ("pod_cgroup_id", ctypes.c_uint64),
        ("port", Be16),
        ("direction", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 5),
    ]


POD_CIDR_PREFIX_BITS = 96  # family + pod_cgroup_id: always part of an entry's prefix
#: An IPv4 CIDR's bits start after ::ffff:0:0/96 in ``PodCidrKey.addr``.
MAPPED_PREFIX_BITS = 96


class PodCidrKey(ctypes.Structure):
    _fields_ = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint32),  # AF_INET or AF_INET6
        ("pod_cgroup_id", ctypes.c_uint64),
        ("addr", Address),
    ]


class DatapathFeatures(enum.IntFlag):
    FEATURE_SAME_NODE_INBOUND = 1 << 0
    FEATURE_SK_MSG_REDIRECT = 1 << 1
    # 1 << 2 was FEATURE_SK_MSG_TO_APPS, now per pod (PodFlags.POD_SK_MSG_TO_APP): never reuse.
    FEATURE_SK_MSG_TO_EVERY_APP = 1 << 3


class DatapathConfig(ctypes.Structure):
    _fields_ = [("features", ctypes.c_uint32), ("redirect_budget", ctypes.c_uint32)]


class Counter(enum.IntEnum):
    """Per-CPU event counters, by index. Stable numbers: never renumber."""

    COUNTER_CONNECT_OUTBOUND_REDIRECTED = 0
    COUNTER_CONNECT_INBOUND_REDIRECTED = 1
    COUNTER_CONNECT_SIDECAR_TO_OWN_POD = 2
    COUNTER_SOCKHASH_ADDED = 3
    COUNTER_MSG_REDIRECTED = 4
    COUNTER_MSG_BYTES_REDIRECTED = 5
    COUNTER_MSG_PASSED = 6
    COUNTER_ORIGINAL_DST_ANSWERED = 7
    COUNTER_BYPASS_LOCAL_DESTINATION = 8
    COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED = 9
    COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED = 10
    COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION = 11
    COUNTER_BYPASS_INBOUND_PORT_EXCLUDED = 12
    COUNTER_BYPASS_SAME_NODE_INBOUND_DISABLED = 13
    COUNTER_ERROR_MAP_UPDATE = 14
    COUNTER_ERROR_SOCKHASH_UPDATE = 15
    COUNTER_MSG_PEER_NOT_TARGET = 16
    COUNTER_FALLBACK_BUDGET = 17
    COUNTER_FALLBACK_RECEIVER_UNKNOWN = 18
    COUNTER_FALLBACK_REDIRECT_FAILED = 19
    COUNTER_FALLBACK_DRAINING = 20
    COUNTER_ERROR_SOCKET_STATE = 21
    COUNTER_SENDER_LEFT = 22
    COUNTER_ERROR_RECEIVE_BUFFER = 23
    COUNTER_PEER_ADDRESS_RESTORED = 24
    COUNTER_LOCAL_ADDRESS_RESTORED = 25
    COUNTER_BYPASS_NO_INBOUND_LISTENER = 26
    COUNTER_SOCKHASH_KEY_TAKEN = 27
    COUNTER_DNS_CONNECT_CAPTURED = 28
    COUNTER_DNS_DATAGRAM_CAPTURED = 29
    COUNTER_DNS_REPLY_ADDRESS_RESTORED = 30
    COUNTER_BYPASS_FAMILY_NOT_IN_POD = 31
    COUNTER_APP_HOP_ON_TCP = 32

    @property
    def metric_name(self) -> str:
        """``COUNTER_MSG_REDIRECTED`` -> ``msg_redirected``."""
        return self.name.removeprefix("COUNTER_").lower()


COUNTER_MAX = len(Counter)

#: Why a redirecting direction fell back to TCP, by its counter (docs/datapath.md).
FALLBACK_REASONS: dict[Counter, str] = {
    Counter.COUNTER_FALLBACK_BUDGET: "budget",
    Counter.COUNTER_FALLBACK_RECEIVER_UNKNOWN: "receiver_unknown",
    Counter.COUNTER_FALLBACK_REDIRECT_FAILED: "redirect_failed",
    Counter.COUNTER_FALLBACK_DRAINING: "draining",
}

#: Every structure shared with C, by its C name (for the layout test and docs).
SHARED_STRUCTS: dict[str, type[ctypes.Structure]] = {
    "ip_address": IpAddress,
    "sock_tuple": SockTuple,
    "connection": Connection,
    "handshake_key": HandshakeKey,
    "pod_info": PodInfo,
    "pod_port_key": PodPortKey,
    "pod_cidr_key": PodCidrKey,
    "datapath_config": DatapathConfig,
    "socket_state": SocketState,
    "receive_queue": ReceiveQueue,
    "app_reuse": AppReuse,
}

#: Every enum shared with C.
SHARED_ENUMS: tuple[type[enum.IntEnum] | type[enum.IntFlag], ...] = (
    ConnectionFlags,
    SocketFlags,
    AppReuseLimits,
    PodFlags,
    TrafficDirection,
    DatapathFeatures,
    Counter,
)
