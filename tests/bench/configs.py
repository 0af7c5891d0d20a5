"""The configurations measured side by side, and how each one is put in place.

| key | name | Istio iptables | sidecar hops | meshaccel |
|---|---|---|---|---|
| a | no-mesh | none (nat table deleted) | none: client app -> server app | not loaded |
| b | iptables | installed | client -> Envoy A 15001 -> Envoy B 15006 -> app | not loaded |
| e | ceiling | none (nat table deleted) | client -> Envoy A / B explicit listeners -> app | - |
| c | meshaccel-connect | installed | as (b) | CONNECT_FEATURES: connect-time steering only |
| d | meshaccel (default) | installed | as (b) | the default: SK_MSG_FEATURES, default budget |
| d+ | meshaccel-apps | installed | as (b) | (d) + every pod opted in with sk_msg_to_app |

(d) is what meshaccel does when nothing is configured: connect-time steering plus sk_msg into
sidecar sockets, each direction of a connection falling back to TCP once its receiver holds more
than the redirect budget unread. (d+) adds the per-pod opt-in for applications that never read
with ``splice()``: sk_msg delivers into their sockets too. (c) is the old default, no sk_msg.

meshaccel leaves Istio's rules in place, as it does in a real pod: (c), (d) and (d+) run with
the same nat table as (b). The ceiling (e) and no-mesh (a) run with no nat table at all (deleted,
not flushed, so no conntrack hook stays registered in the pods' namespaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from meshaccel.agent.datapath import CONNECT_FEATURES, SK_MSG_FEATURES
from meshaccel.agent.layout import DatapathFeatures
from meshaccel.contract.settings import DEFAULT_REDIRECT_BUDGET


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
    redirect_budget: int = DEFAULT_REDIRECT_BUDGET  # Datapath.load's; only with features
    sk_msg_to_app: bool = False  # every pod of the lab opted in (AcceleratedPod.sk_msg_to_app)
    default: bool = False  # meshaccel as it runs when nothing is configured

    @property
    def label(self) -> str:
        """How tables and the chart name it; the default says so, it is the one that matters."""
        return f"({self.key}) {self.name}" + (" (default)" if self.default else "")

    @property
    def redirects_messages(self) -> bool:
        return self.features is not None and bool(
            self.features & DatapathFeatures.FEATURE_SK_MSG_REDIRECT
        )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"


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
        "meshaccel, connect-time steering only (FEATURE_SAME_NODE_INBOUND; every byte on TCP)",
        iptables=True,
        route=Route.INTERCEPTED,
        features=CONNECT_FEATURES,
    ),
    Config(
        "d",
        "meshaccel",
        "meshaccel's default: connect-time steering + sk_msg into sidecar sockets, a direction "
        f"falling back to TCP past {_mib(DEFAULT_REDIRECT_BUDGET)} unread at its receiver",
        iptables=True,
        route=Route.INTERCEPTED,
        features=SK_MSG_FEATURES,
        default=True,
    ),
    Config(
        "d+",
        "meshaccel-apps",
        "the default + the pods opted in with sk_msg_to_app: sk_msg into app sockets too",
        iptables=True,
        route=Route.INTERCEPTED,
        features=SK_MSG_FEATURES,
        sk_msg_to_app=True,
    ),
)
CONFIGS_BY_KEY = {config.key: config for config in CONFIGS}
DEFAULT_CONFIG = next(config for config in CONFIGS if config.default)


def rotated(configs: tuple[Config, ...], round_index: int) -> list[Config]:
    """The order of one round: rotated by the round number, so that no configuration always
    runs first (after a reload) or always follows the same neighbour."""
    if not configs:
        return []
    shift = round_index % len(configs)
    order = list(configs[shift:] + configs[:shift])
    return order if round_index % 2 == 0 else order[::-1]
