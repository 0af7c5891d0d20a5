"""A ``.bpf.o`` object as libbpf opens it, with its maps and programs: open, prepare, load.

Before load, :class:`ObjectMap` and :class:`ObjectProgram` set what the kernel will get; after
load, a program attaches and pins, and a map's elements are reached through the :class:`Map`
its :meth:`ObjectMap.handle` lends.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from . import btf as _btf
from .closing import Closing
from .constants import _LIBBPF_ERRNO_START, _PERCPU_MAP_TYPES, MapType, ProgType
from .errors import (
    AttachError,
    BpfError,
    LoadError,
    MapError,
    ObjectOpenError,
    PinError,
    VerifierError,
)
from .info import _map_info, _prog_info
from .links import Link
from .maps import Map
from .native import (
    _HINTS,
    _call_int,
    _call_ptr,
    _decode,
    _error,
    _lib,
    _path_arg,
    _pin_hints,
    _tls,
)

if TYPE_CHECKING:
    from .btf import Btf
    from .info import ProgInfo
    from .native import _Hints


class BpfObject(Closing):
    """An opened ``.bpf.o`` (``struct bpf_object``); close it (or use ``with``) exactly once."""

    def __init__(self, ptr: int, path: Path) -> None:
        """Wrap a ``struct bpf_object *``; use :meth:`open`."""
        self._ptr: int | None = ptr
        self.path = path
        self._loaded = False
        self._maps: dict[str, ObjectMap] = {}
        self._programs: dict[str, ObjectProgram] = {}
        lib = _lib()
        cur = lib.bpf_object__next_map(ptr, None)
        while cur:
            m = ObjectMap(int(cur), self)
            self._maps[m.name] = m
            cur = lib.bpf_object__next_map(ptr, cur)
        cur = lib.bpf_object__next_program(ptr, None)
        while cur:
            p = ObjectProgram(int(cur), self)
            self._programs[p.name] = p
            cur = lib.bpf_object__next_program(ptr, cur)

    @classmethod
    def open(cls, path: Path | str) -> BpfObject:
        """``bpf_object__open_file``: parse the ELF object; nothing reaches the kernel yet."""
        path = Path(path)
        ptr, err, log = _call_ptr("bpf_object__open_file", _path_arg(path), None)
        if ptr is None:
            raise _error(
                ObjectOpenError,
                "bpf_object__open_file",
                err,
                f"open BPF object {path}",
                {
                    _errno.ENOENT: (
                        "the file does not exist",
                        "build the BPF objects (make -C bpf) or fix the path",
                    ),
                    _LIBBPF_ERRNO_START: (
                        "the file is not an ELF object",
                        "rebuild it with clang -target bpf",
                    ),
                    _LIBBPF_ERRNO_START + 1: (
                        "the ELF file is not a valid BPF object",
                        "rebuild it with clang -target bpf -g",
                    ),
                    _errno.EINVAL: (
                        "the object is malformed (bad sections, maps or BTF)",
                        "rebuild it with clang -target bpf -O2 -g; see the log",
                    ),
                },
                log,
            )
        return cls(ptr, path)

    def _checked(self) -> int:
        if self._ptr is None:
            raise BpfError(
                f"BPF object {self.path} is closed; fix: keep it open while its maps are used",
                errno=_errno.EBADF,
                func="bpf_object__close",
            )
        return self._ptr

    @property
    def name(self) -> str:
        """libbpf's object name (the file name without ``.o``)."""
        return _decode(_lib().bpf_object__name(self._checked()))

    @property
    def loaded(self) -> bool:
        """True after a successful :meth:`load`."""
        return self._loaded

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._ptr is None

    @property
    def maps(self) -> list[ObjectMap]:
        """All maps in object order, including internal ones (``.rodata`` ...)."""
        self._checked()
        return list(self._maps.values())

    def map(self, name: str) -> ObjectMap:
        """The map called ``name``; ``".rodata"`` etc. also find libbpf's prefixed internal map."""
        self._checked()
        found = self._maps.get(name)
        if found is None and name.startswith("."):
            # libbpf names internal maps "<obj name prefix><section>", e.g. "probe_bp.rodata".
            found = next(
                (m for n, m in self._maps.items() if n.endswith(name) and m.is_internal), None
            )
        if found is None:
            raise MapError(
                f"{self.path}: no map named {name!r}; maps are {sorted(self._maps)}; "
                "fix: check the map name in the C source",
                errno=_errno.ENOENT,
                func="bpf_object__next_map",
            )
        return found

    @property
    def programs(self) -> list[ObjectProgram]:
        """All programs in object order."""
        self._checked()
        return list(self._programs.values())

    def program(self, name: str) -> ObjectProgram:
        """The program whose C function is called ``name``."""
        self._checked()
        found = self._programs.get(name)
        if found is None:
            raise BpfError(
                f"{self.path}: no program named {name!r}; programs are {sorted(self._programs)}; "
                "fix: use the C function name",
                errno=_errno.ENOENT,
                func="bpf_object__next_program",
            )
        return found

    @property
    def btf(self) -> Btf | None:
        """The object's BTF, with ``.rodata``/``.data`` offsets fixed up by libbpf at open."""
        ptr = _lib().bpf_object__btf(self._checked())
        return _btf.Btf(int(ptr), source=str(self.path), owner=self) if ptr else None

    def load(self) -> None:
        """``bpf_object__load``: create (or reuse pinned) maps, verify and load programs."""
        rc, log = _call_int("bpf_object__load", self._checked())
        if rc >= 0:
            self._loaded = True
            return
        _tls.last_failed_load_log = log
        rejected = "BEGIN PROG LOAD LOG" in log or "program load failed" in log
        exc_type: type[LoadError] = VerifierError if rejected else LoadError
        raise _error(
            exc_type,
            "bpf_object__load",
            -rc,
            f"load BPF object {self.path}",
            {
                _errno.EACCES: (
                    "the verifier rejected a program" if rejected else "access denied",
                    "fix the program at the instruction the verifier log names"
                    if rejected
                    else "run as root",
                ),
                _errno.EINVAL: (
                    "the kernel refused a program or map (or a pinned map is incompatible)",
                    "read the log; unpin a stale pinned map whose type, sizes or flags changed",
                ),
                _errno.EPERM: _HINTS[_errno.EPERM],
                _errno.E2BIG: (
                    "a program is too large for the verifier",
                    "split it or simplify loops",
                ),
                _errno.ENOSPC: ("the verifier log did not fit", "simplify the program"),
                _errno.EBUSY: ("the object is already loaded", "load each BpfObject once"),
            },
            log,
        )

    def close(self) -> None:
        """``bpf_object__close`` (once); links created from its programs stay valid."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _lib().bpf_object__close(ptr)

    def __repr__(self) -> str:
        state = "closed" if self._ptr is None else ("loaded" if self._loaded else "opened")
        return f"<BpfObject {self.path} {state}>"


class _ObjectPart:
    """A map or program of a :class:`BpfObject`: a libbpf pointer valid while it is open."""

    _error_type: ClassVar[type[BpfError]] = BpfError
    _kind: ClassVar[str] = ""

    def __init__(self, ptr: int, owner: BpfObject) -> None:
        """Internal; use :meth:`BpfObject.map` or :meth:`BpfObject.program`."""
        self._raw = ptr
        self._owner = owner

    def _ptr(self, func: str) -> int:
        if self._owner.closed:
            raise self._error_type(
                f"{self._kind} of closed object {self._owner.path}; fix: keep the BpfObject open",
                errno=_errno.EBADF,
                func=func,
            )
        return self._raw


class ObjectMap(_ObjectPart):
    """A map of an opened :class:`BpfObject` (``struct bpf_map *``): its declared shape, what is
    set before load (capacity, pin path, a data section's bytes) and, after load,
    :meth:`handle` for its elements."""

    _error_type = MapError
    _kind = "map"

    @property
    def name(self) -> str:
        """libbpf's map name (internal maps: ``<object prefix>.rodata`` ...)."""
        return _decode(_lib().bpf_map__name(self._ptr("bpf_map__name")))

    @property
    def map_type(self) -> MapType:
        """``enum bpf_map_type``."""
        return MapType(int(_lib().bpf_map__type(self._ptr("bpf_map__type"))))

    @property
    def key_size(self) -> int:
        """Key size in bytes."""
        return int(_lib().bpf_map__key_size(self._ptr("bpf_map__key_size")))

    @property
    def value_size(self) -> int:
        """Value size in bytes (of one CPU's slot for per-CPU maps)."""
        return int(_lib().bpf_map__value_size(self._ptr("bpf_map__value_size")))

    @property
    def max_entries(self) -> int:
        """Capacity (as set by :meth:`set_max_entries`, or declared)."""
        return int(_lib().bpf_map__max_entries(self._ptr("bpf_map__max_entries")))

    @property
    def is_percpu(self) -> bool:
        """Whether values have one slot per possible CPU."""
        return self.map_type in _PERCPU_MAP_TYPES

    @property
    def is_internal(self) -> bool:
        """Whether libbpf made this map for a data section (``.rodata``, ``.data``, ``.bss``)."""
        return bool(_lib().bpf_map__is_internal(self._ptr("bpf_map__is_internal")))

    def set_max_entries(self, n: int) -> None:
        """``bpf_map__set_max_entries``; before load only."""
        rc, log = _call_int("bpf_map__set_max_entries", self._ptr("bpf_map__set_max_entries"), n)
        if rc < 0:
            raise _error(
                MapError,
                "bpf_map__set_max_entries",
                -rc,
                f"set max_entries of map {self.name!r} to {n}",
                {
                    _errno.EBUSY: (
                        "the object is already loaded",
                        "call set_max_entries() before BpfObject.load()",
                    )
                },
                log,
            )

    def set_pin_path(self, path: Path | str | None) -> None:
        """``bpf_map__set_pin_path`` before load: reuse a compatible pin there, or pin there."""
        ptr = self._ptr("bpf_map__set_pin_path")
        rc, log = _call_int("bpf_map__set_pin_path", ptr, None if path is None else _path_arg(path))
        if rc < 0:
            raise _error(
                PinError,
                "bpf_map__set_pin_path",
                -rc,
                f"set pin path of map {self.name!r}",
                None,
                log,
            )

    @property
    def pin_path(self) -> Path | None:
        """Where libbpf reuses or pins the map at load (:meth:`set_pin_path`), if anywhere."""
        raw = _lib().bpf_map__pin_path(self._ptr("bpf_map__pin_path"))
        return Path(os.fsdecode(raw)) if raw else None

    @property
    def initial_value(self) -> bytes:
        """``bpf_map__initial_value``: a data section's bytes (after load: what the kernel got)."""
        size = ctypes.c_size_t(0)
        ptr = _lib().bpf_map__initial_value(self._ptr("bpf_map__initial_value"), ctypes.byref(size))
        if not ptr:
            raise MapError(
                f"map {self.name!r} has no initial value; fix: use it on .rodata/.data/.bss maps",
                errno=_errno.EINVAL,
                func="bpf_map__initial_value",
            )
        return ctypes.string_at(ptr, size.value)

    @initial_value.setter
    def initial_value(self, data: bytes) -> None:
        ptr = self._ptr("bpf_map__set_initial_value")
        what = f"set initial value of map {self.name!r} ({len(data)} bytes)"
        hints: _Hints = {
            _errno.EBUSY: ("the object is already loaded", "set .rodata before BpfObject.load()"),
            _errno.EINVAL: (
                f"the data must be exactly the section size ({self.value_size} bytes)",
                "start from the current initial_value and patch it",
            ),
        }
        # libbpf 1.1 answers EINVAL for both causes: tell them apart here.
        if self._owner.loaded:
            raise _error(MapError, "bpf_map__set_initial_value", _errno.EBUSY, what, hints)
        buf = ctypes.create_string_buffer(data, len(data))
        rc, log = _call_int("bpf_map__set_initial_value", ptr, buf, len(data))
        if rc < 0:
            raise _error(MapError, "bpf_map__set_initial_value", -rc, what, hints, log)

    def handle(self) -> Map:
        """After load: the kernel map as a :class:`Map` that borrows the object's fd, for its
        elements and pins. Valid while the object is open; closing it leaves the fd alone."""
        fd = int(_lib().bpf_map__fd(self._ptr("bpf_map__fd")))
        if fd < 0:
            raise MapError(
                f"map {self.name!r} has no fd: its object is not loaded; "
                "fix: load() the object first, then take handle()",
                errno=_errno.EINVAL,
                func="bpf_map__fd",
            )
        name = self.name
        return Map(fd, _map_info(fd, f"read info of map {name!r}"), name=name, lender=self._owner)

    def __repr__(self) -> str:
        try:
            name = self.name
        except BpfError:
            name = "?"  # its object is closed
        return f"<ObjectMap {name!r} of {self._owner.path}>"


class ObjectProgram(_ObjectPart):
    """A program of an opened :class:`BpfObject` (``struct bpf_program *``): its name and type;
    after load its fd, attachment to a cgroup and pins."""

    _kind = "program"

    @property
    def name(self) -> str:
        """The C function name."""
        return _decode(_lib().bpf_program__name(self._ptr("bpf_program__name")))

    @property
    def prog_type(self) -> ProgType:
        """``enum bpf_prog_type`` (from the section name)."""
        return ProgType(int(_lib().bpf_program__type(self._ptr("bpf_program__type"))))

    @property
    def fd(self) -> int:
        """The program fd, after load; libbpf owns it (it closes with the object)."""
        fd = int(_lib().bpf_program__fd(self._ptr("bpf_program__fd")))
        if fd < 0:
            raise BpfError(
                f"program {self.name!r} has no fd: its object is not loaded; fix: load() first",
                errno=_errno.EINVAL,
                func="bpf_program__fd",
            )
        return fd

    def info(self) -> ProgInfo:
        """After load, ``bpf_obj_get_info_by_fd``: type, id, tag, kernel name."""
        return _prog_info(self.fd, f"read info of program {self.name!r}")

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        """``bpf_program__attach_cgroup``: a BPF link (multi-attach) to the cgroup dir fd."""
        ptr, err, log = _call_ptr(
            "bpf_program__attach_cgroup", self._ptr("bpf_program__attach_cgroup"), cgroup_fd
        )
        if ptr is None:
            raise _error(
                AttachError,
                "bpf_program__attach_cgroup",
                err,
                f"attach program {self.name!r} to cgroup fd {cgroup_fd}",
                {
                    _errno.EBADF: (
                        "the cgroup fd is not open",
                        "open the cgroup v2 directory with O_RDONLY|O_DIRECTORY",
                    ),
                    _errno.EINVAL: (
                        "the program is not a loaded cgroup program, or the fd is no cgroup2 dir",
                        "load first; use a cgroup/* section; open a dir under find_cgroup2_mount()",
                    ),
                },
                log,
            )
        return Link(ptr)

    def pin(self, path: Path | str) -> None:
        """``bpf_program__pin``: pin the loaded program at ``path`` on bpffs."""
        rc, log = _call_int("bpf_program__pin", self._ptr("bpf_program__pin"), _path_arg(path))
        if rc < 0:
            raise _error(
                PinError,
                "bpf_program__pin",
                -rc,
                f"pin program {self.name!r} at {path}",
                _pin_hints(path),
                log,
            )

    def unpin(self, path: Path | str) -> None:
        """``bpf_program__unpin``: remove the pin at ``path``."""
        rc, log = _call_int("bpf_program__unpin", self._ptr("bpf_program__unpin"), _path_arg(path))
        if rc < 0:
            raise _error(
                PinError,
                "bpf_program__unpin",
                -rc,
                f"unpin program {self.name!r} at {path}",
                None,
                log,
            )

    def __repr__(self) -> str:
        try:
            name = self.name
        except BpfError:
            name = "?"  # its object is closed
        return f"<ObjectProgram {name!r} of {self._owner.path}>"
