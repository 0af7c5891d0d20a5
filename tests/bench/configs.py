"""The configurations measured side by side, and how each one is put in place.

| key | name | Istio iptables | sidecar hops | meshaccel |
|---|---|---|---|---|
| a | no-mesh | none (nat table deleted) | none: client app -> server app | not loaded |
| b | iptables | installed | client -> Envoy A 15001 -> Envoy B 15006 -> app | not loaded |
| e | ceiling | none (nat table deleted) | client -> Envoy A / B explicit listeners -> app | - |
| c | meshaccel-connect | installed | as (b) | FEATURE_SAME_NODE_INBOUND |
| d | meshaccel | installed | as (b) | (c) + FEATURE_SK_MSG_REDIRECT (opt-in) |
| d+ | meshaccel-apps | installed | as (b) | (d) + FEATURE_SK_MSG_TO_APPS (opt-in) |

meshaccel leaves Istio's rules in place, as it does in a real pod: (c), (d) and (d+) run with
the same nat table as (b). The ceiling (e) and no-mesh (a) run with no nat table at all (deleted,
not flushed, so no conntrack hook stays registered in the pods' namespaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from meshaccel.agent.datapath import SK_MSG_FEATURES
from meshaccel.agent.layout import DatapathFeatures


class Route(Enum):
    """How the client addresses the server."""

    DIRECT = "direct"  # the server app's own address; nothing on the way (a)
    INTERCEPTED = "intercepted"  # the server app's own address, caught by the mesh (b, c, d)
    EXPLICIT = "explicit"  # Envoy A's explicit listener on 127.0.0.1 (e)


@dataclass(frozen=True)
class Config:
    key: str
    name: str
    description: str
    iptables: bool
    route: Route
    features: DatapathFeatures | None = None  # None: meshaccel not loaded

    @property
    def label(self) -> str:
        return f"({self.key}) {self.name}"

    @property
    def redirects_messages(self) -> bool:
        return self.features is not None and bool(
            self.features & DatapathFeatures.FEATURE_SK_MSG_REDIRECT
        )


CONFIGS: tuple[Config, ...] = (
    Config(
        "a",
        "no-mesh",
        "client app -> server app directly; no iptables, Envoys idle",
        iptables=False,
        route=Route.DIRECT,
    ),
    Config(
        "b",
        "iptables",
        "Istio's iptables interception through both Envoys",
        iptables=True,
        route=Route.INTERCEPTED,
    ),
    Config(
        "e",
        "ceiling",
        "the same two Envoys addressed explicitly, no netfilter at all",
        iptables=False,
        route=Route.EXPLICIT,
    ),
    Config(
        "c",
        "meshaccel-connect",
        "meshaccel, connect-time redirection only (FEATURE_SAME_NODE_INBOUND)",
        iptables=True,
        route=Route.INTERCEPTED,
        features=DatapathFeatures.FEATURE_SAME_NODE_INBOUND,
    ),
    Config(
        "d",
        "meshaccel",
        "meshaccel: connect-time redirection + sk_msg into sidecar sockets (opt-in)",
        iptables=True,
        route=Route.INTERCEPTED,
        features=SK_MSG_FEATURES,
    ),
    Config(
        "d+",
        "meshaccel-apps",
        "meshaccel + FEATURE_SK_MSG_TO_APPS (opt-in): sk_msg into app sockets too",
        iptables=True,
        route=Route.INTERCEPTED,
        features=SK_MSG_FEATURES | DatapathFeatures.FEATURE_SK_MSG_TO_APPS,
    ),
)
CONFIGS_BY_KEY = {config.key: config for config in CONFIGS}


def rotated(configs: tuple[Config, ...], round_index: int) -> list[Config]:
    """The order of one round: rotated by the round number, so that no configuration always
    runs first (after a reload) or always follows the same neighbour."""
    if not configs:
        return []
    shift = round_index % len(configs)
    order = list(configs[shift:] + configs[:shift])
    return order if round_index % 2 == 0 else order[::-1]
