"""What every mesh's nat table text shares: the opening of an iptables-restore table."""

from __future__ import annotations

BUILTIN_CHAINS = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")


def nat_table_head(*chains: str) -> list[str]:
    """The lines that open the nat table for (ip6)iptables-restore: the built-in chains, then
    the mesh's own ``chains``, declared empty."""
    return [
        "*nat",
        *(f":{chain} ACCEPT [0:0]" for chain in BUILTIN_CHAINS),
        *(f":{chain} - [0:0]" for chain in chains),
    ]
