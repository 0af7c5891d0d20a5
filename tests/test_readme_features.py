"""The README's table "What is accelerated, per mesh" says what the code does (no root needed).

Every cell is computed here from the code and compared with what the README says:

* a hop can only be accelerated for a family whose programs the built objects contain (the
  ELF sections of ``agent/objects/*.bpf.o``: ``cgroup/connect4``, ``sockops``, ``sk_msg``; no
  ``cgroup/connect6`` means IPv6 is left to ip6tables);
* and only for a mesh that has a mode (``contract/modes.py``) and that the kernel scenario
  proving the hop runs for: the test function named in ``PROOFS``, which must assert the
  hop's counter, parametrised (``EVERY_MESH`` or its own list) over that mesh and
  (``BOTH_FAMILIES``) over that family;
* the "why" of an accelerated row names the mode's proxy identity and ports as the modes table
  has them.
"""

from __future__ import annotations

import inspect
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from meshaccel.agent.datapath import OBJECT_FILES, default_objects_dir
from meshaccel.contract.modes import MESH_MODES, MeshMode, MeshModeName
from tests.datapath import test_same_node

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## What is accelerated, per mesh"
FAMILIES = ("IPv4", "IPv6")
HOPS = (
    "app -> sidecar",
    "sidecar -> sidecar (same node)",
    "sidecar -> app (inbound)",
    "sk_msg delivery",
)
ACCELERATED, IPTABLES = "accelerated", "iptables"

# The programs each hop needs, per family (ELF section names).
_STEERING = {"IPv4": "cgroup/connect4", "IPv6": "cgroup/connect6"}
REQUIRED_SECTIONS: dict[str, dict[str, frozenset[str]]] = {
    family: {
        "app -> sidecar": frozenset({connect}),
        "sidecar -> sidecar (same node)": frozenset({connect}),
        "sidecar -> app (inbound)": frozenset({connect}),
        "sk_msg delivery": frozenset({connect, "sockops", "sk_msg"}),
    }
    for family, connect in _STEERING.items()
}


@dataclass(frozen=True)
class Proof:
    """The kernel scenario that shows a hop accelerated, and the counter it asserts for it."""

    module: ModuleType
    test: str
    counter: str


_SAME_NODE_PROOFS = {
    "app -> sidecar": Proof(
        test_same_node,
        "test_same_node_call_through_both_sidecars",
        "COUNTER_CONNECT_OUTBOUND_REDIRECTED",
    ),
    "sidecar -> sidecar (same node)": Proof(
        test_same_node,
        "test_same_node_call_through_both_sidecars",
        "COUNTER_CONNECT_INBOUND_REDIRECTED",
    ),
    "sidecar -> app (inbound)": Proof(
        test_same_node,
        "test_same_node_call_through_both_sidecars",
        "COUNTER_CONNECT_SIDECAR_TO_OWN_POD",
    ),
    "sk_msg delivery": Proof(
        test_same_node,
        "test_payload_skips_tcp_entirely_when_apps_are_targets",
        "COUNTER_MSG_BYTES_REDIRECTED",
    ),
}
# The same scenarios prove both families: each must also run for the row's family.
PROOFS: dict[str, dict[str, Proof]] = {"IPv4": _SAME_NODE_PROOFS, "IPv6": _SAME_NODE_PROOFS}
_FAMILY_PARAMETER = {"IPv4": "ipv4", "IPv6": "ipv6"}


@dataclass(frozen=True)
class Row:
    mesh: MeshModeName
    family: str
    cells: dict[str, str]
    why: str


def readme_rows(text: str) -> list[Row]:
    """The table under HEADING: a header, a separator, then one row per mesh and family."""
    section = text.split(HEADING, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, _separator, *body = (_cells(line) for line in lines)
    assert header == ["mesh", "family", *HOPS, "why"], header
    rows = []
    for cells in body:
        assert len(cells) == len(header), cells
        mesh, family, *hops, why = cells
        cells_by_hop = dict(zip(HOPS, hops, strict=True))
        rows.append(Row(MeshModeName(mesh.lower()), family, cells_by_hop, why))
    return rows


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def elf_section_names(path: Path) -> set[str]:
    """Section names of a 64-bit little-endian ELF file (the BPF objects)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not ELF64 LE"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]  # sh_offset of the section-name string table
    return {
        data[names_at + name : data.index(b"\0", names_at + name)].decode() for name, *_ in headers
    }


@pytest.fixture(scope="module")
def sections() -> set[str]:
    found: set[str] = set()
    for name in OBJECT_FILES:
        found |= elf_section_names(default_objects_dir() / name)
    return found


def parametrised_values(module: ModuleType, test: Callable[..., Any], argname: str) -> set[Any]:
    """The values a scenario's module or function marks parametrise ``argname`` with (empty:
    not parametrised, the fixture's default)."""
    marks: list[Any] = []
    for owner in (module, test):
        found = getattr(owner, "pytestmark", [])
        marks += found if isinstance(found, list) else [found]
    values: set[Any] = set()
    for mark in marks:
        if mark.name != "parametrize":
            continue
        argnames, params = mark.args[0], mark.args[1]
        names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else argnames
        if argname in names:
            at = list(names).index(argname)
            values |= {_unwrapped(v, len(names))[at] for v in params}
    return values


def meshes_run_by(module: ModuleType, test: Callable[..., Any]) -> set[MeshModeName]:
    """The meshes a scenario runs for (its netlab_node parametrisation; default Istio)."""
    meshes = parametrised_values(module, test, "netlab_node")
    return {MeshModeName(m) for m in meshes} or {MeshModeName.ISTIO}


def families_run_by(module: ModuleType, test: Callable[..., Any]) -> set[str]:
    """The address families a scenario runs for (its ``family`` parametrisation; default IPv4)."""
    return parametrised_values(module, test, "family") or {"ipv4"}


def _unwrapped(value: Any, width: int) -> tuple[Any, ...]:
    """One parametrisation's values: a pytest.param's, a tuple, or a single value."""
    inner = getattr(value, "values", None)
    if isinstance(inner, tuple):
        return inner
    return tuple(value) if width > 1 else (value,)


def expected_cell(mesh: MeshModeName, family: str, hop: str, sections: set[str]) -> str:
    if not REQUIRED_SECTIONS[family][hop] <= sections:
        return IPTABLES
    proof = PROOFS[family].get(hop)
    if proof is None:
        pytest.fail(f"the objects have {family} programs for {hop!r}: name its proof in PROOFS")
    test = getattr(proof.module, proof.test)
    assert proof.counter in inspect.getsource(test), f"{proof.test} does not check {proof.counter}"
    runs = (
        mesh in MESH_MODES
        and mesh in meshes_run_by(proof.module, test)
        and _FAMILY_PARAMETER[family] in families_run_by(proof.module, test)
    )
    return ACCELERATED if runs else IPTABLES


def mode_summary(mode: MeshMode) -> str:
    """How an accelerated row's "why" names the mode (contract/modes.py)."""
    who = f"uid/gid {mode.sidecar_uid}" if mode.sidecar_by_gid else f"uid {mode.sidecar_uid} only"
    return f"proxy {who}, outbound {mode.outbound_port}, inbound {mode.inbound_port}"


def test_the_table_lists_every_mesh_and_family_once() -> None:
    rows = readme_rows(README.read_text())
    assert sorted((r.mesh, r.family) for r in rows) == sorted(
        (mesh, family) for mesh in MESH_MODES for family in FAMILIES
    )


def test_every_cell_says_what_the_code_does(sections: set[str]) -> None:
    wrong = []
    for row in readme_rows(README.read_text()):
        for hop, said in row.cells.items():
            expected = expected_cell(row.mesh, row.family, hop, sections)
            if said != expected:
                wrong.append(f"{row.mesh} {row.family} {hop!r}: README {said!r}, code {expected!r}")
    assert wrong == []


def test_every_reason_matches_the_modes_and_the_objects(sections: set[str]) -> None:
    for row in readme_rows(README.read_text()):
        if ACCELERATED in row.cells.values():
            assert mode_summary(MESH_MODES[row.mesh]) in row.why, (row.mesh, row.why)
        elif _STEERING[row.family] not in sections:
            name = _STEERING[row.family].split("/")[1]
            assert f"`{name}`" in row.why, (row.mesh, row.family, row.why)
        assert row.why, row


def test_the_checks_can_fail(sections: set[str]) -> None:
    """The table's reading and the expectations find a wrong cell, a wrong mode and a mesh a
    scenario does not run for (so a stale README fails the tests above)."""
    text = README.read_text()
    flipped = re.sub(r"(\| Kuma \| IPv4 \| )accelerated", r"\1iptables", text, count=1)
    (kuma,) = [r for r in readme_rows(flipped) if (r.mesh, r.family) == ("kuma", "IPv4")]
    assert kuma.cells["app -> sidecar"] == IPTABLES
    assert expected_cell(kuma.mesh, "IPv4", "app -> sidecar", sections) == ACCELERATED
    assert mode_summary(MESH_MODES[MeshModeName.LINKERD]) not in kuma.why

    def not_parametrised() -> None: ...

    assert meshes_run_by(ModuleType("unmarked"), not_parametrised) == {MeshModeName.ISTIO}
    assert families_run_by(ModuleType("unmarked"), not_parametrised) == {"ipv4"}
    proof = test_same_node.test_same_node_call_through_both_sidecars
    assert families_run_by(test_same_node, proof) == {"ipv4", "ipv6"}
