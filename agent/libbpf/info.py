"""What the kernel reports about a map, program or link fd (``bpf_obj_get_info_by_fd``)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .constants import MapType, ProgType
from .errors import BpfError, MapError
from .native import _c_u32, _decode, _error, _lib


class _BpfMapInfo(ctypes.Structure):
    """``struct bpf_map_info`` (linux/bpf.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _BpfProgInfo(ctypes.Structure):
    """Leading fields of ``struct bpf_prog_info``; the kernel fills only the length we pass."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


class _BpfLinkInfo(ctypes.Structure):
    """Leading fields of ``struct bpf_link_info``."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
    ]


_InfoStruct = _BpfMapInfo | _BpfProgInfo | _BpfLinkInfo


def _get_info(fd: int, info: _InfoStruct, exc: type[BpfError], what: str) -> None:
    length = _c_u32(ctypes.sizeof(info))
    rc = int(_lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(length)))
    if rc < 0:
        raise _error(exc, "bpf_obj_get_info_by_fd", -rc, what)


@dataclass(frozen=True)
class MapInfo:
    """What the kernel reports for a map fd."""

    map_type: MapType
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


@dataclass(frozen=True)
class ProgInfo:
    """What the kernel reports for a program fd."""

    prog_type: ProgType
    id: int
    tag: bytes
    name: str


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel reports for a link fd."""

    link_type: int
    id: int
    prog_id: int


def _map_info(fd: int, what: str) -> MapInfo:
    info = _BpfMapInfo()
    _get_info(fd, info, MapError, what)
    return MapInfo(
        map_type=MapType(info.type),
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        map_flags=info.map_flags,
        name=_decode(info.name),
    )


def _prog_info(fd: int, what: str) -> ProgInfo:
    info = _BpfProgInfo()
    _get_info(fd, info, BpfError, what)
    return ProgInfo(
        prog_type=ProgType(info.type), id=info.id, tag=bytes(info.tag), name=_decode(info.name)
    )
