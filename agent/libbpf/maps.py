"""A BPF map, from an object or from a pin: its shape, pinning and elements."""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .constants import _PERCPU_MAP_TYPES, MapType, UpdateFlag
from .errors import BpfError, MapError, PinError
from .info import _map_info
from .native import _call_int, _decode, _error, _lib, _obj_get, _path_arg, _pin_hints, possible_cpus

if TYPE_CHECKING:
    from .info import MapInfo
    from .native import _Hints
    from .objects import BpfObject


class Map:
    """A BPF map: one of a :class:`BpfObject` (``struct bpf_map *``) or an owned fd from a pin."""

    def __init__(
        self,
        *,
        _ptr: int | None = None,
        _owner: BpfObject | None = None,
        _fd: int | None = None,
        _info: MapInfo | None = None,
        _pin_path: Path | None = None,
    ) -> None:
        """Internal; use :meth:`BpfObject.map` or :meth:`Map.from_pin`."""
        self._ptr = _ptr
        self._owner = _owner
        self._fd = _fd
        self._info = _info
        self._pin_path = _pin_path

    @classmethod
    def from_pin(cls, path: Path | str) -> Map:
        """Open a pinned map (``bpf_obj_get``); the returned Map owns the fd: close it."""
        fd = _obj_get(path, "bpf-map", "map")
        try:
            info = _map_info(fd, f"read info of pinned map {path}")
        except BaseException:
            os.close(fd)
            raise
        return cls(_fd=fd, _info=info, _pin_path=Path(path))

    def _checked_ptr(self, func: str) -> int:
        if self._ptr is None or self._owner is None:
            raise MapError(
                f"{func}: map {self.name!r} was opened from a pin and has no libbpf object; "
                "fix: call this on the map of a BpfObject (before load where it applies)",
                errno=_errno.EINVAL,
                func=func,
            )
        if self._owner.closed:
            raise MapError(
                f"map of closed object {self._owner.path}; fix: keep the BpfObject open",
                errno=_errno.EBADF,
                func=func,
            )
        return self._ptr

    @property
    def name(self) -> str:
        """Map name (libbpf's for object maps, the kernel's 15-character one for pins)."""
        if self._info is not None:
            return self._info.name
        return _decode(_lib().bpf_map__name(self._checked_ptr("bpf_map__name")))

    @property
    def fd(self) -> int:
        """The map fd; object maps have one only after load."""
        if self._ptr is None:
            if self._fd is None:
                raise MapError(f"map {self.name!r} is closed", errno=_errno.EBADF, func="close")
            return self._fd
        fd = int(_lib().bpf_map__fd(self._checked_ptr("bpf_map__fd")))
        if fd < 0:
            raise MapError(
                f"map {self.name!r} has no fd: its object is not loaded; fix: load() it first",
                errno=_errno.EINVAL,
                func="bpf_map__fd",
            )
        return fd

    @property
    def key_size(self) -> int:
        """Key size in bytes."""
        if self._info is not None:
            return self._info.key_size
        return int(_lib().bpf_map__key_size(self._checked_ptr("bpf_map__key_size")))

    @property
    def value_size(self) -> int:
        """Value size in bytes (of one CPU's slot for per-CPU maps)."""
        if self._info is not None:
            return self._info.value_size
        return int(_lib().bpf_map__value_size(self._checked_ptr("bpf_map__value_size")))

    @property
    def max_entries(self) -> int:
        """Capacity."""
        if self._info is not None:
            return self._info.max_entries
        return int(_lib().bpf_map__max_entries(self._checked_ptr("bpf_map__max_entries")))

    @property
    def map_type(self) -> MapType:
        """``enum bpf_map_type``."""
        if self._info is not None:
            return self._info.map_type
        return MapType(int(_lib().bpf_map__type(self._checked_ptr("bpf_map__type"))))

    @property
    def is_percpu(self) -> bool:
        """Whether values have one slot per possible CPU (use the ``*_percpu`` methods)."""
        return self.map_type in _PERCPU_MAP_TYPES

    @property
    def is_internal(self) -> bool:
        """Whether libbpf made this map for a data section (``.rodata``, ``.data``, ``.bss``)."""
        if self._ptr is None:
            return False
        return bool(_lib().bpf_map__is_internal(self._checked_ptr("bpf_map__is_internal")))

    def info(self) -> MapInfo:
        """``bpf_obj_get_info_by_fd``: the kernel's view (id, sizes, flags)."""
        return _map_info(self.fd, f"read info of map {self.name!r}")

    def set_max_entries(self, n: int) -> None:
        """``bpf_map__set_max_entries``; before load only."""
        rc, log = _call_int(
            "bpf_map__set_max_entries", self._checked_ptr("bpf_map__set_max_entries"), n
        )
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
        ptr = self._checked_ptr("bpf_map__set_pin_path")
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
        """Where the map is (to be) pinned, if known."""
        if self._ptr is None:
            return self._pin_path
        raw = _lib().bpf_map__pin_path(self._checked_ptr("bpf_map__pin_path"))
        return Path(os.fsdecode(raw)) if raw else None

    def pin(self, path: Path | str) -> None:
        """Pin the loaded map at ``path`` on bpffs."""
        if self._ptr is None:
            rc, log = _call_int("bpf_obj_pin", self.fd, _path_arg(path))
            func = "bpf_obj_pin"
        else:
            rc, log = _call_int("bpf_map__pin", self._checked_ptr("bpf_map__pin"), _path_arg(path))
            func = "bpf_map__pin"
        if rc < 0:
            raise _error(
                PinError, func, -rc, f"pin map {self.name!r} at {path}", _pin_hints(path), log
            )
        self._pin_path = Path(path)

    def unpin(self, path: Path | str | None = None) -> None:
        """Remove the pin at ``path`` (default: the map's pin path)."""
        if self._ptr is not None:
            ptr = self._checked_ptr("bpf_map__unpin")
            rc, log = _call_int("bpf_map__unpin", ptr, None if path is None else _path_arg(path))
            if rc < 0:
                raise _error(PinError, "bpf_map__unpin", -rc, f"unpin map {self.name!r}", None, log)
            return
        target = path if path is not None else self._pin_path
        if target is None:
            raise PinError(
                f"map {self.name!r} has no pin path; fix: pass the path to unpin()",
                errno=_errno.EINVAL,
                func="unlink",
            )
        try:
            os.unlink(target)
        except OSError as exc:
            raise _error(
                PinError, "unlink", exc.errno or _errno.EIO, f"unpin map at {target}"
            ) from exc

    @property
    def initial_value(self) -> bytes:
        """``bpf_map__initial_value``: a data section's bytes (after load: what the kernel got)."""
        size = ctypes.c_size_t(0)
        ptr = _lib().bpf_map__initial_value(
            self._checked_ptr("bpf_map__initial_value"), ctypes.byref(size)
        )
        if not ptr:
            raise MapError(
                f"map {self.name!r} has no initial value; fix: use it on .rodata/.data/.bss maps",
                errno=_errno.EINVAL,
                func="bpf_map__initial_value",
            )
        return ctypes.string_at(ptr, size.value)

    @initial_value.setter
    def initial_value(self, data: bytes) -> None:
        ptr = self._checked_ptr("bpf_map__set_initial_value")
        what = f"set initial value of map {self.name!r} ({len(data)} bytes)"
        hints: _Hints = {
            _errno.EBUSY: ("the object is already loaded", "set .rodata before BpfObject.load()"),
            _errno.EINVAL: (
                f"the data must be exactly the section size ({self.value_size} bytes)",
                "start from the current initial_value and patch it",
            ),
        }
        # libbpf 1.1 answers EINVAL for both causes: tell them apart here.
        if self._owner is not None and self._owner.loaded:
            raise _error(MapError, "bpf_map__set_initial_value", _errno.EBUSY, what, hints)
        buf = ctypes.create_string_buffer(data, len(data))
        rc, log = _call_int("bpf_map__set_initial_value", ptr, buf, len(data))
        if rc < 0:
            raise _error(MapError, "bpf_map__set_initial_value", -rc, what, hints, log)

    # --- element operations (bytes in, bytes out) ---

    def _buf(self, data: bytes, size: int, what: str, func: str) -> ctypes.Array[ctypes.c_char]:
        # The kernel reads exactly key_size/value_size bytes: a shorter buffer would be overread.
        if len(data) != size:
            raise MapError(
                f"map {self.name!r}: {what} is {len(data)} bytes, the map wants {size}; "
                f"fix: pack the {what} to exactly {size} bytes (see the map's BTF type)",
                errno=_errno.EINVAL,
                func=func,
            )
        return ctypes.create_string_buffer(data, size)

    def _percpu_stride(self) -> int:
        return (self.value_size + 7) // 8 * 8  # the kernel rounds each CPU's slot up to 8 bytes

    def _require_percpu(self, want: bool, func: str) -> None:
        if self.is_percpu != want:
            other = "lookup_percpu()/update_percpu()" if want is False else "lookup()/update()"
            raise MapError(
                f"map {self.name!r} is {self.map_type.name}; fix: use {other}",
                errno=_errno.EINVAL,
                func=func,
            )

    def _elem_error(self, func: str, err: int, what: str) -> BpfError:
        return _error(
            MapError,
            func,
            err,
            f"{what} in map {self.name!r}",
            {
                _errno.EEXIST: (
                    "the key exists and BPF_NOEXIST was given",
                    "use UpdateFlag.ANY or EXIST",
                ),
                _errno.ENOENT: (
                    "the key does not exist and BPF_EXIST was given",
                    "use UpdateFlag.ANY or NOEXIST",
                ),
                _errno.E2BIG: (
                    f"the map is full ({self.max_entries} entries)",
                    "delete entries or raise max_entries",
                ),
                _errno.EINVAL: (
                    "the kernel refused the operation for this map type or flags",
                    "arrays cannot delete; sockhash values must be socket fds",
                ),
            },
        )

    def _lookup_raw(self, key: bytes, size: int) -> bytes | None:
        fd = self.fd
        kbuf = self._buf(key, self.key_size, "key", "bpf_map_lookup_elem")
        vbuf = ctypes.create_string_buffer(size)
        rc = int(_lib().bpf_map_lookup_elem(fd, kbuf, vbuf))
        if rc < 0:
            if -rc == _errno.ENOENT:
                return None
            raise self._elem_error("bpf_map_lookup_elem", -rc, "look up a key")
        return vbuf.raw

    def _update_raw(self, key: bytes, value: bytes, size: int, flags: int) -> None:
        fd = self.fd
        kbuf = self._buf(key, self.key_size, "key", "bpf_map_update_elem")
        vbuf = self._buf(value, size, "value", "bpf_map_update_elem")
        rc = int(_lib().bpf_map_update_elem(fd, kbuf, vbuf, int(flags)))
        if rc < 0:
            raise self._elem_error("bpf_map_update_elem", -rc, "update a key")

    def lookup(self, key: bytes) -> bytes | None:
        """The value at ``key``, or None when absent."""
        self._require_percpu(False, "bpf_map_lookup_elem")
        return self._lookup_raw(key, self.value_size)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        """One value per possible CPU (per-CPU maps), or None when absent."""
        self._require_percpu(True, "bpf_map_lookup_elem")
        stride, size = self._percpu_stride(), self.value_size
        raw = self._lookup_raw(key, stride * possible_cpus())
        if raw is None:
            return None
        return [raw[i : i + size] for i in range(0, len(raw), stride)]

    def update(self, key: bytes, value: bytes, flags: int = UpdateFlag.ANY) -> None:
        """Insert or replace ``key`` (``flags``: :class:`UpdateFlag`)."""
        self._require_percpu(False, "bpf_map_update_elem")
        self._update_raw(key, value, self.value_size, flags)

    def update_percpu(
        self, key: bytes, values: Sequence[bytes], flags: int = UpdateFlag.ANY
    ) -> None:
        """Write one value per possible CPU (``len(values) == possible_cpus()``)."""
        self._require_percpu(True, "bpf_map_update_elem")
        cpus, size, stride = possible_cpus(), self.value_size, self._percpu_stride()
        if len(values) != cpus:
            raise MapError(
                f"map {self.name!r}: got {len(values)} per-CPU values for {cpus} possible CPUs; "
                "fix: pass exactly possible_cpus() values",
                errno=_errno.EINVAL,
                func="bpf_map_update_elem",
            )
        for v in values:
            self._buf(v, size, "value", "bpf_map_update_elem")
        packed = b"".join(v.ljust(stride, b"\0") for v in values)
        self._update_raw(key, packed, stride * cpus, flags)

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False when it was absent."""
        fd = self.fd
        kbuf = self._buf(key, self.key_size, "key", "bpf_map_delete_elem")
        rc = int(_lib().bpf_map_delete_elem(fd, kbuf))
        if rc < 0:
            if -rc == _errno.ENOENT:
                return False
            raise self._elem_error("bpf_map_delete_elem", -rc, "delete a key")
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate keys (``bpf_map_get_next_key``); concurrent deletes may restart a hash walk."""
        fd, size = self.fd, self.key_size
        prev: ctypes.Array[ctypes.c_char] | None = None
        while True:
            nxt = ctypes.create_string_buffer(size)
            rc = int(_lib().bpf_map_get_next_key(fd, prev, nxt))
            if rc < 0:
                if -rc == _errno.ENOENT:
                    return
                raise self._elem_error("bpf_map_get_next_key", -rc, "iterate keys")
            yield nxt.raw
            prev = nxt

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Iterate (key, value) of a non-per-CPU map, skipping keys deleted meanwhile."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def close(self) -> None:
        """Close an owned fd (maps from :meth:`from_pin`); object maps close with their object."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        try:
            name = self.name
        except BpfError:
            name = "?"  # its object is closed
        where = f" pin={self._pin_path}" if self._ptr is None else ""
        return f"<Map {name!r}{where}>"
