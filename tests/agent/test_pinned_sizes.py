"""A pinned datapath's map sizes against the settings (no kernel). The maps max_pods sizes need
not be equal (pod_ips and app_reuse hold two entries a pod, one per family, as Capacities
says): a datapath loaded with the settings is adopted on restart, whatever the multiple."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshaccel.agent.datapath import DEFAULT_FEATURES, LoadedConfig
from meshaccel.agent.main import Difference, pinned_differences
from meshaccel.contract.settings import DEFAULT_REDIRECT_BUDGET, AgentSettings, Capacities

SETTINGS = AgentSettings(max_pods=64, listen_address="127.0.0.1", insecure_no_token=True)
WANTED = SETTINGS.capacities.max_entries()
POD_MAPS = ("pods", "pod_ips", "inbound_listeners", "app_reuse")  # what max_pods sizes


@dataclass
class PinnedSizes:
    """The two things pinned_differences reads of a Datapath."""

    sizes: dict[str, int]
    loaded_config: LoadedConfig

    def max_entries(self, name: str) -> int:
        return self.sizes[name]


def sized(**changed: int) -> PinnedSizes:
    return PinnedSizes(
        {**WANTED, **changed}, LoadedConfig(DEFAULT_FEATURES, DEFAULT_REDIRECT_BUDGET)
    )


OTHER_MAX_PODS = Capacities(pods=32).max_entries()
ODD_POD_IPS = WANTED["pod_ips"] + 1

CASES = [
    ("loaded with these settings: adopted", sized(), ()),
    (
        "another max_pods: named as the setting",
        sized(**{name: OTHER_MAX_PODS[name] for name in POD_MAPS}),
        (Difference("max_pods", 32, 64),),
    ),
    (
        "pod_ips sized unlike any max_pods: every size named",
        sized(pod_ips=ODD_POD_IPS),
        (Difference("max_pods", f"64/{ODD_POD_IPS}/64/128", 64),),
    ),
]


@pytest.mark.parametrize(("reason", "pinned", "expected"), CASES, ids=[c[0] for c in CASES])
def test_max_pods_sizes_maps_by_their_own_multiple(
    reason: str, pinned: PinnedSizes, expected: tuple[Difference, ...]
) -> None:
    assert pinned_differences(pinned, SETTINGS) == expected, reason  # type: ignore[arg-type]
