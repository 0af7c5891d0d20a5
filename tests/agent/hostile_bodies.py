"""Bodies a hostile or broken client may send to PUT /v1/pods, for the API's tests
(``test_server.py``, over the kernel's maps and the in-memory ones)."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.agent.conftest import pod_ip, uid

#: (body, status, pydantic loc of the first error or None, reason): each refused, none applied.
MALFORMED_BODIES: list[tuple[str | bytes, int, list[object] | None, str]] = [
    ("{", 400, None, "truncated JSON"),
    ("", 400, None, "empty body"),
    (b"\xff\xfe{}", 400, None, "not UTF-8"),
    ("[]", 422, [], "JSON, but not an object"),
    ('{"generation": 1}', 422, ["pods"], "pods missing"),
    ('{"generation": -1, "pods": []}', 422, ["generation"], "negative generation"),
    ('{"generation": 1e400, "pods": []}', 422, ["generation"], "infinite generation"),
    (
        '{"generation": 100000000000000000000000, "pods": []}',
        422,
        ["generation"],
        "beyond int64",
    ),
    ('{"generation": 1, "pods": [], "force": true}', 422, ["force"], "unknown field"),
    (
        '{"generation": 1, "pods": [{"uid": "u", "namespace": "n", "name": "p", '
        '"ip": "127.0.0.1"}]}',
        422,
        ["pods", 0, "ip"],
        "loopback pod address",
    ),
    (
        '{"generation": 1, "pods": [{"uid": "u", "namespace": "n", "name": "p", '
        '"ip": "198.18.1.1", "options": {"excluded_outbound_ports": [0]}}]}',
        422,
        ["pods", 0, "options", "excluded_outbound_ports", 0],
        "port 0",
    ),
    (
        '{"generation": 1, "pods": ['
        '{"uid": "u", "namespace": "n", "name": "p", "ip": "198.18.1.1"},'
        '{"uid": "u", "namespace": "n", "name": "q", "ip": "198.18.1.2"}]}',
        422,
        [],
        "duplicate uid",
    ),
    # JSON's own types only: lax parsing would read these as 0.0.0.1, 10.0.0.1 and port 1.
    (
        '{"generation": 1, "pods": [{"uid": "u", "namespace": "n", "name": "p", "ip": true}]}',
        422,
        ["pods", 0, "ip"],
        "a boolean for an address",
    ),
    (
        '{"generation": 1, "pods": [{"uid": "u", "namespace": "n", "name": "p", "ip": 167772161}]}',
        422,
        ["pods", 0, "ip"],
        "a number for an address",
    ),
    (
        '{"generation": 1, "pods": [{"uid": "u", "namespace": "n", "name": "p", '
        '"ip": "198.18.1.1", "options": {"excluded_outbound_ports": [true]}}]}',
        422,
        ["pods", 0, "options", "excluded_outbound_ports", 0],
        "a boolean for a port",
    ),
    (
        '{"generation": 1, "pods": [{"uid": "u", "namespace": "n", "name": "p", '
        '"ip": "198.18.1.1", "options": {"sk_msg_to_app": "yes"}}]}',
        422,
        ["pods", 0, "options", "sk_msg_to_app"],
        "a string for a boolean",
    ),
]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, 1e308]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
uids = st.sampled_from([uid(i) for i in range(4)]) | st.text(max_size=70) | json_values
ips = (
    st.sampled_from([str(pod_ip(i)) for i in range(4)])
    | st.ip_addresses(v=4).map(str)
    | st.ip_addresses(v=6).map(str)
    | json_values
)
ports = st.integers(min_value=-5, max_value=70000) | json_values
port_lists = st.lists(ports, max_size=5) | json_values
cidrs = st.lists(
    st.sampled_from(["10.0.0.0/8", "10.0.0.1/8", "0.0.0.0/0", "::/0", "1.2.3.4/33", "x"])
    | json_values,
    max_size=4,
)
pod_options = st.fixed_dictionaries(
    {},
    optional={
        "excluded_outbound_ports": port_lists,
        "excluded_inbound_ports": port_lists,
        "excluded_outbound_cidrs": cidrs,
        "included_outbound_cidrs": cidrs | st.none(),
        "sk_msg_to_app": st.booleans() | json_values,
        "unknown": json_values,
    },
)
pods = st.fixed_dictionaries(
    {
        "uid": uids,
        "namespace": st.sampled_from(["default", "Default", "", "a" * 254]) | json_values,
        "name": st.sampled_from(["web", "web-1", "-web"]) | json_values,
        "ip": ips,
    },
    optional={
        "mode": st.sampled_from(["istio", "linkerd", "kuma", "cilium"]) | json_values,
        "options": pod_options | json_values,
        "cgroup": st.none() | st.text(max_size=30) | json_values,
        "extra": json_values,
    },
)
pod_sets = st.fixed_dictionaries(
    {
        "generation": st.integers(min_value=-(2**70), max_value=2**70)
        | st.sampled_from([0, 10, 11, 2**63 - 1])
        | json_values,
        "pods": st.lists(pods, max_size=5) | json_values,
    },
    optional={"unknown": json_values},
)


# A valid set with at most one defect: exercises the checks after the first field, and the
# accepting path (unresolvable pods, stale and equal generations) as often as refusals.
DEFECTS = {
    "duplicate uid": lambda d: d["pods"].append({**d["pods"][0], "ip": "198.18.9.9"}),
    "duplicate ip": lambda d: d["pods"].append({**d["pods"][0], "uid": "other"}),
    "port 65536": lambda d: d["pods"][0].update(options={"excluded_inbound_ports": [65536]}),
    "unknown field": lambda d: d["pods"][0].update(priority=1),
    "generation 2**63": lambda d: d.update(generation=2**63),
    "generation -1": lambda d: d.update(generation=-1),
    "generation as text": lambda d: d.update(generation="12"),
    "ip as number": lambda d: d["pods"][0].update(ip=3232235777),
    "host bits in cidr": lambda d: d["pods"][0].update(
        options={"excluded_outbound_cidrs": ["10.0.0.1/8"]}
    ),
    "unknown mode": lambda d: d["pods"][0].update(mode="cilium"),
    "pods null": lambda d: d.update(pods=None),
}


@st.composite
def near_valid_sets(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(min_value=1, max_value=5))
    members = draw(st.lists(st.integers(0, 5), min_size=count, max_size=count, unique=True))
    addresses = draw(st.lists(st.integers(0, 30), min_size=count, max_size=count, unique=True))
    document: dict[str, Any] = {
        # relative to the applied generation (set by the test): stale, equal or newer
        "generation_delta": draw(st.integers(min_value=-1, max_value=3)),
        "pods": [
            {
                # 4 and 5 are never resolvable: they stay unresolved
                "uid": uid(i) if i < 4 else f"ghost-{i}",
                "namespace": "default",
                "name": f"pod-{i}",
                "ip": str(pod_ip(address)),
                "mode": draw(st.sampled_from(["istio", "linkerd", "kuma"])),
                "options": {
                    "excluded_outbound_ports": draw(
                        st.lists(st.integers(1, 65535), max_size=3, unique=True)
                    ),
                    "included_outbound_cidrs": draw(
                        st.none() | st.just(["10.0.0.0/8"]) | st.just([])
                    ),
                },
            }
            for i, address in zip(members, addresses, strict=True)
        ],
    }
    defect = draw(st.none() | st.sampled_from(sorted(DEFECTS)))
    if defect is not None:
        DEFECTS[defect](document)
    return document
