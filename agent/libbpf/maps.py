"""A kernel map through its fd (from a pin, or borrowed from a loaded object): its elements."""

from __future__ import annotations

import ctypes
import errno as _errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import _PERCPU_MAP_TYPES, MapType, UpdateFlag
from .errors import BpfError, MapError
from .handles import FdHandle
from .info import _map_info
from .native import _error, _lib, _obj_get, possible_cpus

if TYPE_CHECKING:
    from .info import MapInfo
    from .objects import BpfObject


class Map(FdHandle):
    """A kernel map through an fd: owned (:meth:`from_pin`; close it) or borrowed from a loaded
    object (:meth:`ObjectMap.handle`). Its shape is the kernel's, read when it was opened."""

    _error_type = MapError

    def __init__(
        self,
        fd: int,
        info: MapInfo,
        *,
        name: str | None = None,
        pin_path: Path | None = None,
        lender: BpfObject | None = None,
    ) -> None:
        """Internal; use :meth:`Map.from_pin` or :meth:`ObjectMap.handle`."""
        self._name = name if name is not None else info.name
        super().__init__(fd, label=f"map {self._name!r}", pin_path=pin_path, lender=lender)
        self._info = info

    @classmethod
    def from_pin(cls, path: Path | str) -> Map:
        """Open a pinned map (``bpf_obj_get``); the returned Map owns the fd: close it."""
        fd = _obj_get(path, "bpf-map", "map")
        try:
            info = _map_info(fd, f"read info of pinned map {path}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, info, pin_path=Path(path))

    @property
    def name(self) -> str:
        """Map name (libbpf's when borrowed from an object, the kernel's 15-character one for
        pins)."""
        return self._name

    @property
    def map_type(self) -> MapType:
        """``enum bpf_map_type``."""
        return self._info.map_type

    @property
    def key_size(self) -> int:
        """Key size in bytes."""
        return self._info.key_size

    @property
    def value_size(self) -> int:
        """Value size in bytes (of one CPU's slot for per-CPU maps)."""
        return self._info.value_size

    @property
    def max_entries(self) -> int:
        """Capacity."""
        return self._info.max_entries

    @property
    def is_percpu(self) -> bool:
        """Whether values have one slot per possible CPU (use the ``*_percpu`` methods)."""
        return self.map_type in _PERCPU_MAP_TYPES

    def info(self) -> MapInfo:
        """``bpf_obj_get_info_by_fd``: the kernel's view now (id, sizes, flags)."""
        return _map_info(self.fd, f"read info of map {self.name!r}")

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

    def __repr__(self) -> str:
        where = " borrowed" if self._lender is not None else f" pin={self._pin_path}"
        return f"<Map {self._name!r}{where}{' closed' if self.closed else ''}>"
