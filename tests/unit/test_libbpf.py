"""meshaccel.agent.libbpf against the real libbpf and the real kernel: nothing is mocked.

The probe objects are built from tests/fixtures/bpf/ once per session. Opening objects and
reading BTF needs no root; tests marked ``kernel`` load programs, pin only under a private
directory on bpffs, attach only to a cgroup they create, and remove all of it in teardown.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import logging
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.agent import libbpf, mounts
from tests.requirements import BTF_VMLINUX, require, require_kernel, require_tool

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bpf"
LINUX_BPF_H = Path("/usr/include/linux/bpf.h")
TEST_PREFIX = "meshaccel-test-libbpf"


def require_root_kernel() -> None:
    """Skip locally, or fail when CI=true, unless root, kernel BTF and cgroup v2 are here."""
    __tracebackhide__ = True
    require_kernel()


# --- mirrors of tests/fixtures/bpf/probe.h ---


class Counter(enum.IntEnum):
    """``enum probe_counter``."""

    CONNECT = 0
    MATCHED = 1
    MSG = 2
    MAX = 3


class ProbeConfig(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("port", ctypes.c_uint16),  # network order
        ("enabled", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("weight", ctypes.c_uint64),
    ]


class ProbeFlowKey(ctypes.Structure):
    _fields_ = [
        ("addr", ctypes.c_uint32),  # network order
        ("port", ctypes.c_uint16),  # network order
        ("pad", ctypes.c_uint16),
    ]


class ProbeFlowValue(ctypes.Structure):
    _fields_ = [
        ("calls", ctypes.c_uint64),
        ("magic", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def flow_key(ip: str, port: int) -> bytes:
    return socket.inet_aton(ip) + struct.pack("!HH", port, 0)


def u32(n: int) -> bytes:
    return struct.pack("=I", n)


def u64(n: int) -> bytes:
    return struct.pack("=Q", n)


# --- building the probes ---


@dataclass(frozen=True)
class Probes:
    probe: Path
    bad: Path


@pytest.fixture(scope="session")
def probes(tmp_path_factory: pytest.TempPathFactory) -> Probes:
    require_tool("clang")
    make = require_tool("make")
    out = tmp_path_factory.mktemp("bpf-probes")
    result = subprocess.run(
        [make, "-C", str(FIXTURES), f"OUT={out}"], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"building the test probes failed:\n{result.stdout}\n{result.stderr}")
    return Probes(probe=out / "probe.bpf.o", bad=out / "bad.bpf.o")


def set_config(obj: libbpf.BpfObject, config: ProbeConfig) -> None:
    """Write probe_cfg into the object's .rodata at the offset BTF gives."""
    btf = obj.btf
    assert btf is not None
    variables = {v.name: v for v in btf.datasec_vars(".rodata")}
    var = variables["probe_cfg"]
    assert var.size == ctypes.sizeof(config)
    rodata = obj.map(".rodata")
    data = bytearray(rodata.initial_value)
    data[var.offset : var.offset + var.size] = bytes(config)
    rodata.initial_value = bytes(data)


def counter_total(obj: libbpf.BpfObject, counter: Counter) -> int:
    slots = obj.map("probe_counters").handle().lookup_percpu(u32(counter))
    assert slots is not None
    return sum(struct.unpack("=Q", slot)[0] for slot in slots)


# --- kernel-side fixtures: each undoes exactly what it made, even when the test fails ---


@pytest.fixture
def bpffs_dir() -> Iterator[Path]:
    """A private directory on bpffs for this test's pins; emptied and removed afterwards."""
    require_root_kernel()
    mounts.ensure_bpffs()
    bpffs = Path("/sys/fs/bpf")
    directory = bpffs / f"{TEST_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
    directory.mkdir()
    try:
        yield directory
    finally:
        for entry in directory.iterdir():
            entry.unlink()  # unlinking a pin drops its reference
        directory.rmdir()


def _own_cgroup(cg2: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cg2 / line[3:].lstrip("/")
    return cg2


@pytest.fixture
def test_cgroup() -> Iterator[Path]:
    """A child cgroup of the cgroup2 mount, never the root; removed after the test."""
    require_root_kernel()
    cg2 = mounts.find_cgroup2_mount()
    assert cg2 is not None
    path = cg2 / f"{TEST_PREFIX}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        # Only this test's children can be inside: move any leftover back to our cgroup.
        home = _own_cgroup(cg2) / "cgroup.procs"
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                home.write_text(pid)
        path.rmdir()  # also detaches anything still attached to it


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on 127.0.0.1 (loopback only)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    try:
        yield srv
    finally:
        srv.close()


_CHILD = """
import socket, sys
sys.stdin.readline()  # wait until the parent has moved us into the cgroup
for _ in range(int(sys.argv[2])):
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
"""


def connect_from(cgroup: Path, srv: socket.socket, times: int = 1) -> None:
    """Connect ``times`` to ``srv`` from a child process placed in ``cgroup``."""
    port = srv.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(port), str(times)], stdin=subprocess.PIPE
    )
    try:
        (cgroup / "cgroup.procs").write_text(str(child.pid))
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.close()
        assert child.wait(timeout=30) == 0, "the child's connect failed"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    _drain(srv)


def connect_from_here(srv: socket.socket) -> None:
    socket.create_connection(srv.getsockname(), timeout=5).close()
    _drain(srv)


def _drain(srv: socket.socket) -> None:
    srv.setblocking(False)
    try:
        while True:
            conn, _ = srv.accept()
            conn.close()
    except BlockingIOError:
        pass
    finally:
        srv.setblocking(True)


@pytest.fixture
def loaded(probes: Probes) -> Iterator[libbpf.BpfObject]:
    """The probe object, loaded with matching disabled."""
    require_root_kernel()
    with libbpf.BpfObject.open(probes.probe) as obj:
        obj.load()
        yield obj


# --- opening objects (no root) ---


def test_open_missing_file_names_cause_and_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bpf.o"
    with pytest.raises(libbpf.ObjectOpenError) as info:
        libbpf.BpfObject.open(missing)
    assert info.value.errno == errno.ENOENT
    assert info.value.func == "bpf_object__open_file"
    assert str(missing) in str(info.value)
    assert "fix:" in str(info.value)
    assert "failed to open" in info.value.log  # libbpf's own words, captured


def test_open_non_bpf_file_is_an_open_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"not an ELF object\n" * 8)
    with pytest.raises(libbpf.ObjectOpenError) as info:
        libbpf.BpfObject.open(junk)
    assert info.value.errno == 4001  # LIBBPF_ERRNO__FORMAT
    assert "BPF object format invalid" in str(info.value)


def test_object_lists_maps_and_programs_before_load(probes: Probes) -> None:
    with libbpf.BpfObject.open(probes.probe) as obj:
        maps = {m.name: m for m in obj.maps}
        assert {"probe_flows", "probe_counters", "probe_socks"} <= set(maps)
        flows = obj.map("probe_flows")
        assert (flows.map_type, flows.key_size, flows.value_size, flows.max_entries) == (
            libbpf.MapType.HASH,
            ctypes.sizeof(ProbeFlowKey),
            ctypes.sizeof(ProbeFlowValue),
            64,
        )
        counters = obj.map("probe_counters")
        assert counters.map_type == libbpf.MapType.PERCPU_ARRAY and counters.is_percpu
        assert counters.max_entries == Counter.MAX
        assert obj.map("probe_socks").map_type == libbpf.MapType.SOCKHASH
        rodata = obj.map(".rodata")  # found through libbpf's "<obj>.rodata" name
        assert rodata.is_internal and rodata.name.endswith(".rodata")
        assert rodata.name == obj.map(rodata.name).name
        assert [p.name for p in obj.programs] == ["probe_connect4", "probe_msg"]
        assert obj.program("probe_connect4").prog_type == libbpf.ProgType.CGROUP_SOCK_ADDR
        assert obj.program("probe_msg").prog_type == libbpf.ProgType.SK_MSG
        assert not obj.loaded

        with pytest.raises(libbpf.MapError) as info:
            obj.map("no_such_map")
        assert info.value.errno == errno.ENOENT and "probe_flows" in str(info.value)
        with pytest.raises(libbpf.BpfError):
            obj.program("no_such_program")
        # Elements belong to the loaded map: an object's map has no element operations, and
        # the handle that has them exists only after load.
        assert not hasattr(flows, "lookup") and not hasattr(flows, "fd")
        with pytest.raises(libbpf.MapError, match="not loaded") as info:
            flows.handle()
        assert info.value.errno == errno.EINVAL and "fix: load()" in str(info.value)
        with pytest.raises(libbpf.BpfError, match="not loaded"):
            _ = obj.program("probe_msg").fd


def test_rodata_and_max_entries_are_editable_before_load(probes: Probes) -> None:
    with libbpf.BpfObject.open(probes.probe) as obj:
        rodata = obj.map(".rodata")
        size = len(rodata.initial_value)
        assert size == rodata.value_size == 24  # probe_cfg (16) + probe_bits (8)
        assert rodata.initial_value == bytes(size)
        set_config(obj, ProbeConfig(magic=0xABCD1234, port=socket.htons(8080), enabled=1))
        assert ProbeConfig.from_buffer_copy(rodata.initial_value[:16]).magic == 0xABCD1234
        with pytest.raises(libbpf.MapError) as info:
            rodata.initial_value = b"\x01" * (size - 1)
        assert info.value.errno == errno.EINVAL and f"{size} bytes" in str(info.value)

        obj.map("probe_flows").set_max_entries(5)
        assert obj.map("probe_flows").max_entries == 5


def test_closed_object_refuses_use_instead_of_crashing(probes: Probes) -> None:
    obj = libbpf.BpfObject.open(probes.probe)
    flows = obj.map("probe_flows")
    program = obj.program("probe_connect4")
    btf = obj.btf
    assert btf is not None
    obj.close()
    obj.close()  # once only: a second close is a no-op
    assert obj.closed
    with pytest.raises(libbpf.MapError) as map_info:
        _ = flows.key_size
    assert map_info.value.errno == errno.EBADF
    with pytest.raises(libbpf.BpfError):
        _ = program.name
    with pytest.raises(libbpf.BtfError):
        btf.struct_layout("probe_config")
    with pytest.raises(libbpf.BpfError):
        _ = obj.maps


def test_libbpf_messages_reach_logging_only_at_their_level(
    probes: Probes, caplog: pytest.LogCaptureFixture
) -> None:
    logger = "meshaccel.agent.libbpf"
    with caplog.at_level(logging.INFO, logger=logger):
        libbpf.BpfObject.open(probes.probe).close()
    assert not [r for r in caplog.records if r.name == logger and r.levelno < logging.INFO]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=logger):
        libbpf.BpfObject.open(probes.probe).close()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("probe_flows" in message for message in debug), debug[:5]


# --- BTF (no root) ---


@dataclass(frozen=True)
class LayoutCase:
    struct: str
    mirror: type[ctypes.Structure]
    reason: str


LAYOUT_CASES = [
    LayoutCase("probe_config", ProbeConfig, "the rodata tunables the test writes"),
    LayoutCase("probe_flow_key", ProbeFlowKey, "the hash key the test builds"),
    LayoutCase("probe_flow_value", ProbeFlowValue, "the hash value the test decodes"),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: c.struct)
def test_struct_layout_matches_ctypes_mirror(probes: Probes, case: LayoutCase) -> None:
    with libbpf.Btf.parse(probes.probe) as btf:
        found = btf.struct_layout(case.struct)
    assert found is not None, case.reason
    size, fields = found
    names = [entry[0] for entry in case.mirror._fields_]
    expected = {
        name: (getattr(case.mirror, name).offset, getattr(case.mirror, name).size) for name in names
    }
    assert size == ctypes.sizeof(case.mirror), case.reason
    assert fields == expected, case.reason


def test_bitfield_members_report_bit_positions(probes: Probes) -> None:
    # Hand-derived from probe.h with the C (System V) rules; ctypes lays bitfields out
    # differently, so it cannot serve as the mirror here.
    with libbpf.Btf.parse(probes.probe) as btf:
        layout = btf.struct_layout("probe_bits")
        bits = btf.bitfields("probe_bits")
    assert layout is not None
    assert layout.size == 8
    assert bits == {"low": (0, 3), "mid": (3, 13), "flag": (32, 1), "rest": (33, 7)}
    assert layout.fields["tail"] == (2, 2)
    assert layout.fields["pad"] == (5, 3)
    assert layout.fields["rest"].offset == 4


def test_enum_values_match_mirror(probes: Probes) -> None:
    with libbpf.Btf.parse(probes.probe) as btf:
        values = btf.enum_values("probe_counter")
        assert btf.enum_values("no_such_enum") is None
    assert values == {f"PROBE_CNT_{c.name}": c.value for c in Counter}


def test_datasec_vars_have_libbpf_offsets(probes: Probes) -> None:
    expected = [("probe_cfg", 0, 16), ("probe_bits", 16, 8)]
    with libbpf.Btf.parse(probes.probe) as btf:
        assert btf.datasec_vars(".rodata") == expected
        assert btf.datasec_vars(".bss") == []  # the probe has no .bss
        assert btf.struct_layout("no_such_struct") is None
    with libbpf.BpfObject.open(probes.probe) as obj:
        assert obj.btf is not None
        assert obj.btf.datasec_vars(".rodata") == expected


def test_btf_parse_missing_file_is_a_btf_error(tmp_path: Path) -> None:
    with pytest.raises(libbpf.BtfError) as info:
        libbpf.Btf.parse(tmp_path / "missing.bpf.o")
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize(
    ("py_enum", "c_enum", "prefix"),
    [
        (libbpf.MapType, "bpf_map_type", "BPF_MAP_TYPE_"),
        (libbpf.ProgType, "bpf_prog_type", "BPF_PROG_TYPE_"),
        (libbpf.AttachType, "bpf_attach_type", "BPF_"),
    ],
)
def test_uapi_enums_match_kernel_btf(py_enum: type[enum.IntEnum], c_enum: str, prefix: str) -> None:
    require(BTF_VMLINUX.is_file(), f"needs kernel BTF ({BTF_VMLINUX})")
    with libbpf.Btf.parse(BTF_VMLINUX) as btf:
        kernel = btf.enum_values(c_enum)
    assert kernel is not None
    ours = {prefix + member.name: member.value for member in py_enum}
    assert {name: kernel.get(name) for name in ours} == ours


def test_update_and_attach_flags_match_header() -> None:
    require(LINUX_BPF_H.is_file(), f"needs {LINUX_BPF_H} (Debian package linux-libc-dev)")
    header = LINUX_BPF_H.read_text()
    for member in libbpf.UpdateFlag:
        c_name = "BPF_F_LOCK" if member.name == "LOCK" else f"BPF_{member.name}"
        match = re.search(rf"\b{c_name}\s*=\s*(\d+)", header)
        assert match and int(match.group(1)) == member.value, c_name
    for flag in (libbpf.AttachFlag.ALLOW_OVERRIDE, libbpf.AttachFlag.ALLOW_MULTI):
        match = re.search(rf"#define BPF_F_{flag.name}\s+\(1U << (\d+)\)", header)
        assert match and 1 << int(match.group(1)) == flag.value, flag.name


@pytest.mark.parametrize(
    ("c_struct", "mirror"),
    [
        ("bpf_map_info", libbpf.info._BpfMapInfo),
        ("bpf_prog_info", libbpf.info._BpfProgInfo),
        ("bpf_link_info", libbpf.info._BpfLinkInfo),
    ],
)
def test_info_structs_are_a_prefix_of_the_kernel_layout(
    c_struct: str, mirror: type[ctypes.Structure]
) -> None:
    require(BTF_VMLINUX.is_file(), f"needs kernel BTF ({BTF_VMLINUX})")
    with libbpf.Btf.parse(BTF_VMLINUX) as btf:
        layout = btf.struct_layout(c_struct)
    assert layout is not None
    for name in (entry[0] for entry in mirror._fields_):
        if name.startswith("_"):
            continue  # padding the kernel leaves unnamed
        ours = (getattr(mirror, name).offset, getattr(mirror, name).size)
        assert layout.fields[name] == ours, f"{c_struct}.{name}"
    assert ctypes.sizeof(mirror) <= layout.size


def test_possible_cpus_matches_sysfs() -> None:
    spec = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in spec.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    assert libbpf.possible_cpus() == count


# --- kernel: load, maps, pins, attach ---


@pytest.mark.kernel
def test_load_freezes_the_rodata_that_was_set(probes: Probes) -> None:
    require_root_kernel()
    config = ProbeConfig(magic=0x5EED, port=socket.htons(4242), enabled=1, weight=3)
    with libbpf.BpfObject.open(probes.probe) as obj:
        set_config(obj, config)
        obj.load()
        assert obj.loaded
        rodata = obj.map(".rodata")
        in_kernel = rodata.handle().lookup(u32(0))  # the kernel's copy of the section
        assert in_kernel is not None
        assert in_kernel[:16] == bytes(config)
        assert rodata.initial_value[:16] == bytes(config)
        with pytest.raises(libbpf.MapError) as info:
            rodata.initial_value = bytes(rodata.value_size)
        assert info.value.errno == errno.EBUSY
        with pytest.raises(libbpf.MapError) as info:
            obj.map("probe_flows").set_max_entries(8)
        assert info.value.errno == errno.EBUSY
        with pytest.raises(libbpf.LoadError):
            obj.load()  # once per object


@pytest.mark.kernel
def test_hash_map_element_operations(probes: Probes) -> None:
    require_root_kernel()
    with libbpf.BpfObject.open(probes.probe) as obj:
        obj.map("probe_flows").set_max_entries(3)
        obj.load()
        flows = obj.map("probe_flows").handle()
        assert flows.max_entries == flows.info().max_entries == 3
        keys = [flow_key("127.0.0.1", port) for port in (1, 2, 3)]
        values = [bytes(ProbeFlowValue(calls=i, magic=0x100 + i)) for i in range(3)]

        assert flows.lookup(keys[0]) is None
        for key, value in zip(keys, values, strict=True):
            flows.update(key, value, libbpf.UpdateFlag.NOEXIST)
        assert sorted(flows.keys()) == sorted(keys)
        assert dict(flows.items()) == dict(zip(keys, values, strict=True))
        assert flows.lookup(keys[1]) == values[1]

        with pytest.raises(libbpf.MapError) as info:
            flows.update(keys[0], values[0], libbpf.UpdateFlag.NOEXIST)
        assert info.value.errno == errno.EEXIST
        with pytest.raises(libbpf.MapError) as info:
            flows.update(flow_key("127.0.0.1", 9), values[0])  # a fourth entry in a map of 3
        assert info.value.errno == errno.E2BIG
        flows.update(keys[0], values[2], libbpf.UpdateFlag.EXIST)
        assert flows.lookup(keys[0]) == values[2]

        assert flows.delete(keys[0]) is True
        assert flows.delete(keys[0]) is False
        with pytest.raises(libbpf.MapError) as info:
            flows.update(keys[0], values[0], libbpf.UpdateFlag.EXIST)
        assert info.value.errno == errno.ENOENT
        assert sorted(flows.keys()) == sorted(keys[1:])

        with pytest.raises(libbpf.MapError) as info:
            flows.lookup(b"short")  # never handed to the kernel: it would read 8 bytes
        assert info.value.errno == errno.EINVAL and "8" in str(info.value)
        with pytest.raises(libbpf.MapError):
            flows.update(keys[1], b"\0" * 3)


@pytest.mark.kernel
def test_a_borrowed_map_lives_with_its_object(probes: Probes) -> None:
    require_root_kernel()
    key, value = flow_key("127.0.0.4", 22), bytes(ProbeFlowValue(calls=5))
    obj = libbpf.BpfObject.open(probes.probe)
    try:
        obj.load()
        with obj.map("probe_flows").handle() as flows:
            flows.update(key, value)
        with pytest.raises(libbpf.MapError) as info:
            flows.lookup(key)  # this handle is closed ...
        assert info.value.errno == errno.EBADF
        again = obj.map("probe_flows").handle()
        assert again.lookup(key) == value  # ... the object's fd is not
    finally:
        obj.close()
    with pytest.raises(libbpf.MapError) as info:
        again.lookup(key)  # the fd went with its object: refused, never reused
    assert info.value.errno == errno.EBADF and "keep the BpfObject open" in str(info.value)


@pytest.mark.kernel
def test_percpu_array_has_one_slot_per_possible_cpu(loaded: libbpf.BpfObject) -> None:
    counters = loaded.map("probe_counters").handle()
    cpus = libbpf.possible_cpus()
    slots = counters.lookup_percpu(u32(Counter.MSG))
    assert slots == [bytes(8)] * cpus
    wanted = [u64(1000 + cpu) for cpu in range(cpus)]
    counters.update_percpu(u32(Counter.MSG), wanted)
    assert counters.lookup_percpu(u32(Counter.MSG)) == wanted
    assert counter_total(loaded, Counter.MSG) == sum(1000 + cpu for cpu in range(cpus))
    assert sorted(counters.keys()) == [u32(c) for c in range(Counter.MAX)]
    with pytest.raises(libbpf.MapError, match="lookup_percpu"):
        counters.lookup(u32(0))
    with pytest.raises(libbpf.MapError, match="possible"):
        counters.update_percpu(u32(0), wanted[:1] * (cpus + 1))
    with pytest.raises(libbpf.MapError, match="lookup\\(\\)"):
        loaded.map("probe_flows").handle().lookup_percpu(flow_key("127.0.0.1", 1))


@pytest.mark.kernel
def test_pin_open_pinned_and_unpin(loaded: libbpf.BpfObject, bpffs_dir: Path) -> None:
    flows = loaded.map("probe_flows").handle()
    map_pin = bpffs_dir / "flows"
    flows.pin(map_pin)
    assert map_pin.exists() and flows.pin_path == map_pin
    with pytest.raises(libbpf.PinError) as info:
        loaded.map("probe_counters").handle().pin(map_pin)
    assert info.value.errno == errno.EEXIST and "unpin the old object" in str(info.value)

    with libbpf.Map.from_pin(map_pin) as pinned:
        assert pinned.info().id == flows.info().id
        assert (pinned.name, pinned.map_type, pinned.key_size, pinned.value_size) == (
            "probe_flows",
            libbpf.MapType.HASH,
            8,
            16,
        )
        key = flow_key("127.0.0.2", 80)
        pinned.update(key, bytes(ProbeFlowValue(calls=7)))
        assert flows.lookup(key) == bytes(ProbeFlowValue(calls=7))  # one kernel map
        pinned.unpin()
    assert not map_pin.exists()

    program = loaded.program("probe_connect4")
    prog_pin = bpffs_dir / "connect4"
    program.pin(prog_pin)
    with libbpf.Program.from_pin(prog_pin) as pinned_prog:
        prog_info = pinned_prog.info()
        assert prog_info == program.info()
        assert (prog_info.name, prog_info.prog_type) == (
            "probe_connect4",
            libbpf.ProgType.CGROUP_SOCK_ADDR,
        )
    with pytest.raises(libbpf.PinError, match="bpf-prog, not a bpf-map"):
        libbpf.Map.from_pin(prog_pin)
    program.unpin(prog_pin)
    assert not prog_pin.exists()

    with pytest.raises(libbpf.PinError) as info:
        libbpf.Map.from_pin(bpffs_dir / "missing")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(libbpf.PinError) as info:
        flows.pin(Path("/tmp") / f"{TEST_PREFIX}-not-bpffs-{os.getpid()}")
    assert "bpffs" in str(info.value)


@pytest.mark.kernel
def test_set_pin_path_reuses_the_pinned_map(probes: Probes, bpffs_dir: Path) -> None:
    require_root_kernel()
    shared = bpffs_dir / "shared_flows"
    key, value = flow_key("127.0.0.3", 443), bytes(ProbeFlowValue(calls=1, magic=9))
    with libbpf.BpfObject.open(probes.probe) as first:
        first.map("probe_flows").set_pin_path(shared)
        assert first.map("probe_flows").pin_path == shared
        first.load()
        assert shared.exists()  # pinned by libbpf at load
        first_flows = first.map("probe_flows").handle()
        first_flows.update(key, value)
        first_id = first_flows.info().id

    with libbpf.BpfObject.open(probes.probe) as second:
        second.map("probe_flows").set_pin_path(shared)
        second.load()
        second_flows = second.map("probe_flows").handle()
        assert second_flows.info().id == first_id
        assert second_flows.lookup(key) == value  # survived the first object

    with libbpf.BpfObject.open(probes.probe) as incompatible:
        flows = incompatible.map("probe_flows")
        flows.set_pin_path(shared)
        flows.set_max_entries(32)  # differs from the pinned map: libbpf must refuse it
        with pytest.raises(libbpf.LoadError) as info:
            incompatible.load()
    assert not isinstance(info.value, libbpf.VerifierError)
    assert "reuse" in info.value.log and str(shared) in info.value.log
    with libbpf.Map.from_pin(shared) as pinned:
        pinned.unpin()
    assert not shared.exists()


@pytest.mark.kernel
def test_verifier_error_carries_the_whole_log(probes: Probes) -> None:
    require_root_kernel()
    with libbpf.BpfObject.open(probes.bad) as obj, pytest.raises(libbpf.VerifierError) as info:
        obj.load()
    err = info.value
    assert err.errno == errno.EACCES
    assert err.func == "bpf_object__load"
    assert "invalid access to map value" in err.log
    assert "invalid access to map value" in str(err)
    # The log is one printf of several KiB: it must arrive whole, first line to last.
    assert len(err.log) > 4096
    assert "BEGIN PROG LOAD LOG" in err.log and "END PROG LOAD LOG" in err.log
    assert re.search(r"^0: ", err.log, re.MULTILINE)
    assert libbpf.last_failed_load_log() == err.log


@pytest.mark.kernel
def test_failed_load_log_is_kept_per_thread(probes: Probes) -> None:
    require_root_kernel()
    logs: list[str] = []

    def load_bad() -> None:
        with libbpf.BpfObject.open(probes.bad) as obj, contextlib.suppress(libbpf.VerifierError):
            obj.load()
        logs.append(libbpf.last_failed_load_log())

    before = libbpf.last_failed_load_log()
    worker = threading.Thread(target=load_bad)
    worker.start()
    worker.join(timeout=60)
    assert logs and "invalid access to map value" in logs[0]
    assert libbpf.last_failed_load_log() == before  # this thread's log is untouched


@pytest.mark.kernel
def test_connect4_link_counts_only_processes_in_its_cgroup(
    probes: Probes, test_cgroup: Path, listener: socket.socket
) -> None:
    require_root_kernel()
    port = listener.getsockname()[1]
    config = ProbeConfig(magic=0xC0FFEE, port=socket.htons(port), enabled=1, weight=7)
    with libbpf.BpfObject.open(probes.probe) as obj:
        set_config(obj, config)
        obj.load()
        cgroup_fd = os.open(test_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            link = obj.program("probe_connect4").attach_cgroup(cgroup_fd)
        finally:
            os.close(cgroup_fd)
        with link:
            assert link.info().prog_id == obj.program("probe_connect4").info().id
            connect_from_here(listener)  # this process is not in the cgroup
            assert counter_total(obj, Counter.CONNECT) == 0

            connect_from(test_cgroup, listener, times=2)
            assert counter_total(obj, Counter.CONNECT) == 2
            assert counter_total(obj, Counter.MATCHED) == 2 * config.weight
            raw = obj.map("probe_flows").handle().lookup(flow_key("127.0.0.1", port))
            assert raw is not None
            flow = ProbeFlowValue.from_buffer_copy(raw)
            assert (flow.calls, flow.magic) == (2, config.magic)  # rodata reached the program
        assert link.destroyed

        connect_from(test_cgroup, listener)
        assert counter_total(obj, Counter.CONNECT) == 2  # detached with the link


@pytest.mark.kernel
def test_pinned_link_outlives_its_handle_until_detached(
    loaded: libbpf.BpfObject, test_cgroup: Path, bpffs_dir: Path, listener: socket.socket
) -> None:
    link_pin = bpffs_dir / "connect4_link"
    cgroup_fd = os.open(test_cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        link = loaded.program("probe_connect4").attach_cgroup(cgroup_fd)
    finally:
        os.close(cgroup_fd)
    with link:
        link.pin(link_pin)
        assert link.pin_path == link_pin
    connect_from(test_cgroup, listener)
    assert counter_total(loaded, Counter.CONNECT) == 1  # the pin keeps it attached

    with libbpf.Link.open_pinned(link_pin) as reopened:
        assert reopened.info().prog_id == loaded.program("probe_connect4").info().id
        reopened.detach()  # now, although the pin still exists
        assert link_pin.exists()
        connect_from(test_cgroup, listener)
        assert counter_total(loaded, Counter.CONNECT) == 1
        reopened.unpin()
    assert not link_pin.exists()

    with pytest.raises(libbpf.PinError) as info:
        libbpf.Link.open_pinned(link_pin)
    assert info.value.errno == errno.ENOENT


@pytest.mark.kernel
def test_attach_to_a_non_cgroup_fd_is_an_attach_error(
    loaded: libbpf.BpfObject, tmp_path: Path
) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(libbpf.AttachError) as info:
            loaded.program("probe_connect4").attach_cgroup(fd)
    finally:
        os.close(fd)
    assert info.value.func == "bpf_program__attach_cgroup"
    assert "fix:" in str(info.value)


@pytest.mark.kernel
def test_sk_msg_attaches_to_sockhash_with_prog_attach(
    loaded: libbpf.BpfObject, listener: socket.socket
) -> None:
    socks = loaded.map("probe_socks").handle()
    msg = loaded.program("probe_msg")
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(socket.create_connection(listener.getsockname(), timeout=5))
        server, _ = listener.accept()
        stack.enter_context(server)

        libbpf.prog_attach(msg.fd, socks.fd, libbpf.AttachType.SK_MSG_VERDICT)
        attached = True
        try:
            # Sockets take the map's programs when they are added: attach first.
            socks.update(u32(0), u32(client.fileno()))
            assert list(socks.keys()) == [u32(0)]
            client.sendall(b"ping")
            assert server.recv(16) == b"ping"  # SK_PASS: delivered as usual
            assert counter_total(loaded, Counter.MSG) == 1
            assert socks.delete(u32(0)) is True

            libbpf.prog_detach(msg.fd, socks.fd, libbpf.AttachType.SK_MSG_VERDICT)
            attached = False
            socks.update(u32(0), u32(client.fileno()))
            client.sendall(b"pong")
            assert server.recv(16) == b"pong"
            assert counter_total(loaded, Counter.MSG) == 1  # no verdict program any more
            socks.delete(u32(0))
        finally:
            if attached:
                libbpf.prog_detach(msg.fd, socks.fd, libbpf.AttachType.SK_MSG_VERDICT)

    with pytest.raises(libbpf.AttachError) as info:
        libbpf.prog_detach(msg.fd, socks.fd, libbpf.AttachType.SK_MSG_VERDICT)
    assert info.value.errno == errno.ENOENT


@pytest.mark.kernel
def test_kernel_feature_probes() -> None:
    require_root_kernel()
    assert libbpf.probe_prog_type(libbpf.ProgType.CGROUP_SOCK_ADDR)
    assert libbpf.probe_prog_type(libbpf.ProgType.SK_MSG)
    assert libbpf.probe_map_type(libbpf.MapType.SOCKHASH)
    assert libbpf.probe_map_type(libbpf.MapType.PERCPU_ARRAY)
