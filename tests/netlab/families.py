"""Address families in the lab: the names the scenarios are parametrised with, and the few
addresses that differ between IPv4 and IPv6 in a pod (loopback, the inbound passthrough source).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

Family = Literal["ipv4", "ipv6"]
FAMILIES: tuple[Family, ...] = ("ipv4", "ipv6")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK: dict[Family, str] = {"ipv4": "127.0.0.1", "ipv6": "::1"}
# Istio's (and Kuma's) inbound passthrough connects from these; istio-iptables puts ::6 on lo.
PASSTHROUGH_SOURCE: dict[Family, str] = {"ipv4": "127.0.0.6", "ipv6": "::6"}
HOST_PREFIX: dict[Family, int] = {"ipv4": 32, "ipv6": 128}


def family_of(address: IPAddress | str) -> Family:
    return "ipv6" if ipaddress.ip_address(str(address)).version == 6 else "ipv4"


def host_cidr(address: str) -> str:
    """One address as a CIDR of its family: 127.0.0.1/32, ::1/128."""
    return f"{address}/{HOST_PREFIX[family_of(address)]}"


def format_address(ip: IPAddress | str, port: int) -> str:
    """ "ip:port", an IPv6 address in brackets: as Envoy's access log and apps.py print it."""
    host = str(ip)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_prefix(ip: IPAddress | str) -> str:
    """What every "ip:port" of this address starts with: "ip:" or "[ip]:"."""
    return format_address(ip, 0)[:-1]
