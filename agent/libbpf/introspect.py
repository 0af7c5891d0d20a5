"""What the kernel and libbpf offer and hold, asked without loading the datapath: libbpf's
version, the helpers an opened object's programs call, whether a program type may call a
helper, and the programs attached to a cgroup (``BPF_PROG_QUERY``)."""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import struct
import threading
from typing import Any

from .constants import AttachType, ProgType
from .errors import BpfError
from .info import ProgInfo, _prog_info
from .native import _c_char_p, _c_int, _c_u32, _c_void_p, _decode, _error, _lib
from .objects import ObjectProgram

# linux/bpf.h
BPF_F_QUERY_EFFECTIVE = 1 << 0
_BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
_BPF_MOV64_IMM_R0 = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K
_BPF_EXIT = 0x95
_INSN = struct.Struct("<BBhi")  # code, dst_reg:4 | src_reg:4, off, imm

# What the verifier says when a program type may not call a helper: 5.x "unknown func",
# "invalid func unknown#N" for an id it does not know, 6.x "cannot use helper".
_HELPER_REFUSALS = ("cannot use helper", "unknown func", "invalid func")
_PROBE_LOG_SIZE = 4096


class _ProgLoadOpts(ctypes.Structure):
    """``struct bpf_prog_load_opts`` of libbpf 1.1 (``sz`` lets newer libbpf read it)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("attempts", ctypes.c_int),
        ("expected_attach_type", ctypes.c_int),
        ("prog_btf_fd", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_ifindex", ctypes.c_uint32),
        ("kern_version", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("attach_btf_obj_fd", ctypes.c_uint32),
        ("fd_array", ctypes.c_void_p),
        ("func_info", ctypes.c_void_p),
        ("func_info_cnt", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_void_p),
        ("line_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_void_p),
    ]


# name -> (restype, argtypes), from /usr/include/bpf/{libbpf,bpf}.h of libbpf 1.1.
_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "libbpf_version_string": (_c_char_p, ()),
    "bpf_program__insns": (_c_void_p, (_c_void_p,)),
    "bpf_program__insn_cnt": (ctypes.c_size_t, (_c_void_p,)),
    "bpf_program__expected_attach_type": (_c_int, (_c_void_p,)),
    "bpf_prog_load": (
        _c_int,
        (_c_int, _c_char_p, _c_char_p, _c_void_p, ctypes.c_size_t, ctypes.POINTER(_ProgLoadOpts)),
    ),
    "bpf_prog_query": (
        _c_int,
        (
            _c_int,
            _c_int,
            _c_u32,
            ctypes.POINTER(_c_u32),
            ctypes.POINTER(_c_u32),
            ctypes.POINTER(_c_u32),
        ),
    ),
    "bpf_prog_get_fd_by_id": (_c_int, (_c_u32,)),
}
_declared = False
_declare_lock = threading.Lock()


def _fn(name: str) -> Any:
    """``name`` of libbpf with its signature (declared here on first use)."""
    global _declared
    lib = _lib()
    if not _declared:
        with _declare_lock:
            for func, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, func)
                fn.restype, fn.argtypes = restype, argtypes
            _declared = True
    return getattr(lib, name)


def libbpf_version() -> str:
    """libbpf's own version, e.g. ``v1.1``."""
    return _decode(_fn("libbpf_version_string")())


def program_helpers(program: ObjectProgram) -> frozenset[int]:
    """The helper ids (``enum bpf_func_id``) ``program`` calls, read from its instructions
    before load (subprograms in ``.text`` are not included: the objects inline them)."""
    ptr = program._ptr("bpf_program__insns")
    count = int(_fn("bpf_program__insn_cnt")(ptr))
    insns = _fn("bpf_program__insns")(ptr)
    if not insns or count == 0:
        return frozenset()
    raw = ctypes.string_at(insns, count * _INSN.size)
    found = set()
    for code, regs, _off, imm in _INSN.iter_unpack(raw):
        if code == _BPF_CALL and regs >> 4 == 0:  # src_reg 0: a helper (1 subprogram, 2 kfunc)
            found.add(imm)
    return frozenset(found)


def program_attach_type(program: ObjectProgram) -> AttachType:
    """The attach type libbpf derived from the program's section name."""
    func = "bpf_program__expected_attach_type"
    return AttachType(int(_fn(func)(program._ptr(func))))


def probe_helper(prog_type: ProgType, attach_type: AttachType, helper: int) -> bool:
    """Whether this kernel lets a ``prog_type`` program (attached as ``attach_type``) call
    ``helper``, for this process's capabilities (some helpers need CAP_PERFMON).

    Loads a two-instruction program that calls it; the verifier names a helper the type may
    not call, and refuses the rest for their arguments (which the probe leaves unset).
    libbpf's own ``libbpf_probe_bpf_helper`` sets no attach type, which the kernel requires
    for cgroup_sock_addr programs, so it answers "supported" for every helper there.
    """
    insns = b"".join(
        (
            _INSN.pack(_BPF_CALL, 0, 0, helper),
            _INSN.pack(_BPF_MOV64_IMM_R0, 0, 0, 1),
            _INSN.pack(_BPF_EXIT, 0, 0, 0),
        )
    )
    log = ctypes.create_string_buffer(_PROBE_LOG_SIZE)
    opts = _ProgLoadOpts(
        sz=ctypes.sizeof(_ProgLoadOpts),
        expected_attach_type=int(attach_type),
        log_level=1,
        log_size=_PROBE_LOG_SIZE,
        log_buf=ctypes.addressof(log),
    )
    fd = int(_fn("bpf_prog_load")(int(prog_type), None, b"GPL", insns, 3, ctypes.byref(opts)))
    if fd >= 0:
        os.close(fd)
        return True
    text = log.value.decode("utf-8", "replace")
    if any(refusal in text for refusal in _HELPER_REFUSALS):
        return False
    if not text:  # refused before the verifier ran (privileges, an unknown program type)
        err = ctypes.get_errno() or -fd
        raise _error(
            BpfError,
            "bpf_prog_load",
            err,
            f"probe helper #{helper} for {prog_type.name} programs ({attach_type.name})",
        )
    return True  # the verifier got past the helper's availability to its arguments


def query_cgroup_programs(
    cgroup_fd: int, attach_type: AttachType, *, effective: bool = True
) -> list[int]:
    """Ids of the programs attached to the cgroup as ``attach_type``: those that run for it
    (``effective``: its ancestors' included, in the order they run) or only its own."""
    flags = BPF_F_QUERY_EFFECTIVE if effective else 0
    size = 64
    while True:
        ids = (_c_u32 * size)()
        count = _c_u32(size)
        attach_flags = _c_u32(0)
        rc = int(
            _fn("bpf_prog_query")(
                cgroup_fd,
                int(attach_type),
                flags,
                ctypes.byref(attach_flags),
                ids,
                ctypes.byref(count),
            )
        )
        if rc == -_errno.ENOSPC and count.value > size:
            size = count.value  # more were attached than we had room for: ask again
            continue
        if rc < 0:
            raise _error(
                BpfError,
                "bpf_prog_query",
                -rc,
                f"query the {attach_type.name} programs of cgroup fd {cgroup_fd}",
            )
        return list(ids[: count.value])


def program_info_by_id(prog_id: int) -> ProgInfo:
    """What the kernel reports for the program with this id (``bpf_prog_get_fd_by_id``: the
    kernel asks for CAP_SYS_ADMIN, EPERM without it)."""
    fd = int(_fn("bpf_prog_get_fd_by_id")(prog_id))
    if fd < 0:
        raise _error(BpfError, "bpf_prog_get_fd_by_id", -fd, f"open program id {prog_id}")
    try:
        return _prog_info(fd, f"read info of program id {prog_id}")
    finally:
        os.close(fd)
