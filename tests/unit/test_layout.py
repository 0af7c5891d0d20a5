"""The ABI shared with C is defined once in bpf/include/meshaccel.h; its Python mirror must match.

Structures are checked against the BTF of every compiled object (no root needed); enums,
which clang leaves out of BTF, against the header itself compiled by the host compiler.
"""

from __future__ import annotations

import ctypes
import enum
import json
import shutil
import subprocess
import tempfile
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from meshaccel.agent import layout, libbpf
from meshaccel.agent.datapath import OBJECT_FILES, default_objects_dir
from tests.requirements import require

BPF_INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"


def objects() -> list[Path]:
    return [default_objects_dir() / name for name in OBJECT_FILES]


@pytest.fixture(scope="module")
def built_objects() -> list[Path]:
    paths = objects()
    missing = [p.name for p in paths if not p.exists()]
    require(not missing, f"eBPF objects not built ({missing}): run `make -C bpf`")
    return paths


@pytest.mark.parametrize("c_name", sorted(layout.SHARED_STRUCTS))
def test_struct_matches_btf_of_every_object(built_objects: list[Path], c_name: str) -> None:
    mirror = layout.SHARED_STRUCTS[c_name]
    expected = {
        name: (getattr(mirror, name).offset, getattr(mirror, name).size)
        for name, *_ in mirror._fields_
    }
    seen_in = 0
    for path in built_objects:
        with libbpf.Btf.parse(path) as btf:
            found = btf.struct_layout(c_name)
        if found is None:
            continue
        seen_in += 1
        size, fields = found
        assert size == ctypes.sizeof(mirror), f"sizeof(struct {c_name}) differs in {path.name}"
        assert fields == expected, f"struct {c_name} fields differ in {path.name}"
    assert seen_in, f"struct {c_name} is in no object's BTF"


def test_rodata_holds_only_the_config(built_objects: list[Path]) -> None:
    for path in built_objects:
        with libbpf.Btf.parse(path) as btf:
            variables = btf.datasec_vars(".rodata")
        assert [(name, size) for name, _, size in variables] in (
            [],
            [("config", ctypes.sizeof(layout.DatapathConfig))],
        ), f"{path.name}: unexpected .rodata {variables}"


def _c_enum_values(names: list[str]) -> dict[str, int]:
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    require(compiler is not None, "no C compiler to read the header's enums")
    assert compiler is not None
    prints = "\n".join(f'  printf("\\"{n}\\": %lld,\\n", (long long){n});' for n in names)
    source = (
        '#include <stdio.h>\n#include "meshaccel.h"\n'
        f'int main(void) {{\n  printf("{{");\n{prints}\n'
        '  printf("\\"_\\": 0}");\n  return 0;\n}\n'
    )
    with tempfile.TemporaryDirectory(prefix="meshaccel-enum-probe-") as tmp:
        build = Path(tmp)
        (build / "probe.c").write_text(source)
        subprocess.run(
            [compiler, "-I", str(BPF_INCLUDE), "-o", str(build / "probe"), str(build / "probe.c")],
            check=True,
            capture_output=True,
            text=True,
        )
        output = subprocess.run(
            [str(build / "probe")], check=True, capture_output=True, text=True
        ).stdout
    values: dict[str, int] = json.loads(output)
    values.pop("_")
    return values


@pytest.mark.parametrize("mirror", layout.SHARED_ENUMS, ids=lambda e: e.__name__)
def test_enum_matches_header(mirror: type[enum.IntEnum] | type[enum.IntFlag]) -> None:
    # A name missing from the header fails the compile, a renumbered one the comparison.
    names = [str(member.name) for member in mirror]
    assert _c_enum_values(names) == {member.name: int(member) for member in mirror}


def test_counter_max_matches_header() -> None:
    assert _c_enum_values(["COUNTER_MAX"]) == {"COUNTER_MAX": layout.COUNTER_MAX}


def test_byte_order_helpers_are_network_order() -> None:
    assert bytes(layout.be16(15001)) == b"\x3a\x99"
    assert bytes(layout.ipv4("198.18.0.10")) == b"\xc6\x12\x00\x0a"
    assert layout.port_of(layout.be16(8080)) == 8080
    assert str(layout.ip_of(layout.ipv4("127.0.0.6"))) == "127.0.0.6"


def test_addresses_are_sixteen_bytes_with_ipv4_mapped() -> None:
    """struct ip_address: an IPv4 address as the kernel shows an IPv4 peer of an IPv6 socket."""
    mapped = bytes(layout.address("198.18.0.10"))
    assert mapped == bytes(10) + b"\xff\xff" + b"\xc6\x12\x00\x0a"
    assert mapped == IPv6Address("::ffff:198.18.0.10").packed
    assert bytes(layout.address("fd00:198:18::10")) == IPv6Address("fd00:198:18::10").packed
    assert layout.address_of(mapped) == IPv4Address("198.18.0.10")
    assert layout.address_of(IPv6Address("fd00::1").packed) == IPv6Address("fd00::1")
    assert layout.address_of(bytes(16)) == IPv6Address("::")  # zero: no address, never mapped


def test_tuple_size_is_what_the_sockhash_keys_cost() -> None:
    """sock_tuple grew from 32 to 56 bytes with 16-byte addresses (docs/datapath.md, IPv6)."""
    assert ctypes.sizeof(layout.SockTuple) == 56
    assert ctypes.sizeof(layout.PodInfo) == 32 and layout.PodInfo.ipv6.offset == 16
