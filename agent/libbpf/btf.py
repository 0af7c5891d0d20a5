"""BTF: the layouts of structs, enums and data sections, read from an object file."""

from __future__ import annotations

import ctypes
import errno as _errno
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import objects
from .closing import Closing
from .constants import BtfKind
from .errors import BtfError, ObjectOpenError
from .native import _call_ptr, _decode, _error, _lib, _path_arg

if TYPE_CHECKING:
    from .objects import BpfObject


# --- BTF ---


class _BtfType(ctypes.Structure):
    """``struct btf_type`` (linux/btf.h); kind-specific records follow it in memory."""

    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("info", ctypes.c_uint32),
        ("size_or_type", ctypes.c_uint32),
    ]


class _BtfMember(ctypes.Structure):
    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
    ]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [
        ("name_off", ctypes.c_uint32),
        ("val_lo32", ctypes.c_uint32),
        ("val_hi32", ctypes.c_uint32),
    ]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("offset", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
    ]


class FieldLayout(NamedTuple):
    """A struct member's byte offset and size (a bitfield: the byte holding its first bit)."""

    offset: int
    size: int


class BitfieldLayout(NamedTuple):
    """A bitfield member's position in bits."""

    bit_offset: int
    bit_size: int


class StructLayout(NamedTuple):
    """``(size, {member: (offset, size)})`` of a struct; anonymous members are flattened."""

    size: int
    fields: dict[str, FieldLayout]


class DatasecVar(NamedTuple):
    """A variable in a data section (``.rodata`` ...): name, byte offset, size."""

    name: str
    offset: int
    size: int


_ELF_MAGIC = b"\x7fELF"


class Btf(Closing):
    """BTF type information, read-only; from :meth:`parse` or :attr:`BpfObject.btf`."""

    def __init__(
        self,
        ptr: int,
        *,
        source: str,
        owner: BpfObject | None = None,
        owns_owner: bool = False,
    ) -> None:
        """Wrap a ``struct btf *``: freed on close unless it belongs to ``owner``."""
        self._ptr: int | None = ptr
        self._owner = owner
        self._owns_owner = owns_owner
        self.source = source

    @classmethod
    def parse(cls, path: Path | str) -> Btf:
        """BTF of a ``.bpf.o`` or a raw BTF file (``/sys/kernel/btf/vmlinux``); no root needed.

        A BPF object is opened through libbpf (nothing reaches the kernel) so that data
        sections get the offsets libbpf assigns; clang leaves them at zero in the ELF.
        """
        path = Path(path)
        try:
            with path.open("rb") as f:
                is_elf = f.read(4) == _ELF_MAGIC
        except OSError as exc:
            raise _error(
                BtfError, "btf__parse", exc.errno or _errno.EIO, f"parse BTF of {path}"
            ) from exc
        if is_elf:
            try:
                obj = objects.BpfObject.open(path)
            except ObjectOpenError:
                obj = None  # an ELF that is not a BPF object (vmlinux): plain .BTF parsing
            if obj is not None:
                ptr = _lib().bpf_object__btf(obj._checked())
                if ptr:
                    return cls(int(ptr), source=str(path), owner=obj, owns_owner=True)
                obj.close()
        raw, err, log = _call_ptr("btf__parse", _path_arg(path), None)
        if raw is None:
            raise _error(
                BtfError,
                "btf__parse",
                err,
                f"parse BTF of {path}",
                {
                    _errno.ENOENT: (
                        "the file has no .BTF section",
                        "build with clang -g; for the kernel, CONFIG_DEBUG_INFO_BTF=y",
                    ),
                    _errno.ENODATA: ("the file has no .BTF section", "build with clang -g"),
                },
                log,
            )
        return cls(raw, source=str(path))

    def _checked(self) -> int:
        if self._ptr is None or (self._owner is not None and self._owner.closed):
            raise BtfError(f"BTF of {self.source} is closed", errno=_errno.EBADF, func="btf__free")
        return self._ptr

    def close(self) -> None:
        """Free parsed BTF (and the object opened for it); borrowed BTF goes with its object."""
        ptr, self._ptr = self._ptr, None
        if ptr is None:
            return
        if self._owner is None:
            _lib().btf__free(ptr)
        elif self._owns_owner:
            self._owner.close()

    def find(self, name: str, kind: BtfKind) -> int | None:
        """Type id of ``name`` with ``kind``, or None."""
        tid = int(_lib().btf__find_by_name_kind(self._checked(), name.encode(), int(kind)))
        return tid if tid > 0 else None

    def _type(self, tid: int) -> tuple[int, _BtfType]:
        ptr = _lib().btf__type_by_id(self._checked(), tid)
        if not ptr:
            raise BtfError(
                f"BTF of {self.source}: no type id {tid}",
                errno=_errno.EINVAL,
                func="btf__type_by_id",
            )
        return int(ptr), _BtfType.from_address(ptr)

    def _name(self, off: int) -> str:
        return _decode(_lib().btf__name_by_offset(self._checked(), off))

    def _size(self, tid: int) -> int:
        size = int(_lib().btf__resolve_size(self._checked(), tid))
        if size < 0:
            raise _error(BtfError, "btf__resolve_size", -size, f"size of BTF type {tid}")
        return size

    def _struct_id(self, name: str) -> int | None:
        return self.find(name, BtfKind.STRUCT) or self.find(name, BtfKind.UNION)

    def struct_layout(self, name: str) -> StructLayout | None:
        """``(size, {member: (offset, size)})`` of ``struct name`` (or union); None if absent."""
        tid = self._struct_id(name)
        if tid is None:
            return None
        fields: dict[str, FieldLayout] = {}
        for member, (type_id, bit_off, _) in self._members(tid, 0).items():
            fields[member] = FieldLayout(bit_off // 8, self._size(type_id))
        return StructLayout(self._size(tid), fields)

    def bitfields(self, name: str) -> dict[str, BitfieldLayout]:
        """``{member: (bit_offset, bit_size)}`` of the bitfield members of ``struct name``."""
        tid = self._struct_id(name)
        if tid is None:
            return {}
        return {
            member: BitfieldLayout(bit_off, bit_size)
            for member, (_, bit_off, bit_size) in self._members(tid, 0).items()
            if bit_size
        }

    def _members(self, tid: int, base_bits: int) -> dict[str, tuple[int, int, int]]:
        """``{name: (type id, bit offset, bitfield size or 0)}``, anonymous members flattened."""
        out: dict[str, tuple[int, int, int]] = {}
        ptr, t = self._type(tid)
        vlen, kflag = t.info & 0xFFFF, t.info >> 31
        members = (_BtfMember * vlen).from_address(ptr + ctypes.sizeof(_BtfType))
        for m in members:
            if kflag:  # kind_flag set: offset packs (bitfield size << 24) | bit offset
                bit_off, bit_size = m.offset & 0xFFFFFF, m.offset >> 24
            else:
                bit_off, bit_size = m.offset, 0
            bit_off += base_bits
            resolved = int(_lib().btf__resolve_type(self._checked(), m.type))
            rptr, rt = self._type(resolved) if resolved > 0 else (0, None)
            rkind = (rt.info >> 24) & 0x1F if rt is not None else BtfKind.UNKN
            if not kflag and rkind == BtfKind.INT and rt is not None:
                # Old-style bitfield: the INT record itself carries width and extra offset.
                encoding = ctypes.c_uint32.from_address(rptr + ctypes.sizeof(_BtfType)).value
                nbits, extra = encoding & 0xFF, (encoding >> 16) & 0xFF
                if nbits != rt.size_or_type * 8 or extra:
                    bit_off, bit_size = bit_off + extra, nbits
            member = self._name(m.name_off)
            if not member and rkind in (BtfKind.STRUCT, BtfKind.UNION):
                out.update(self._members(resolved, bit_off))  # C reaches these by name
                continue
            out[member] = (int(m.type), bit_off, bit_size)
        return out

    def enum_values(self, name: str) -> dict[str, int] | None:
        """``{enumerator: value}`` of ``enum name`` (ENUM or ENUM64); None if absent."""
        tid = self.find(name, BtfKind.ENUM)
        if tid is not None:
            ptr, t = self._type(tid)
            vlen, signed = t.info & 0xFFFF, t.info >> 31
            entries = (_BtfEnum * vlen).from_address(ptr + ctypes.sizeof(_BtfType))
            # kind_flag marks a signed enum; without it the kernel reads values as unsigned.
            return {
                self._name(e.name_off): e.val if signed else e.val & 0xFFFFFFFF for e in entries
            }
        tid = self.find(name, BtfKind.ENUM64)
        if tid is None:
            return None
        ptr, t = self._type(tid)
        vlen, signed = t.info & 0xFFFF, t.info >> 31
        entries64 = (_BtfEnum64 * vlen).from_address(ptr + ctypes.sizeof(_BtfType))
        result: dict[str, int] = {}
        for e in entries64:
            value = (e.val_hi32 << 32) | e.val_lo32
            if signed and value >= 1 << 63:
                value -= 1 << 64
            result[self._name(e.name_off)] = value
        return result

    def datasec_vars(self, section: str) -> list[DatasecVar]:
        """Variables of data section ``section`` (``".rodata"`` ...); [] if there is none."""
        tid = self.find(section, BtfKind.DATASEC)
        if tid is None:
            return []
        ptr, t = self._type(tid)
        infos = (_BtfVarSecinfo * (t.info & 0xFFFF)).from_address(ptr + ctypes.sizeof(_BtfType))
        result = [
            DatasecVar(self._name(self._type(v.type)[1].name_off), v.offset, v.size) for v in infos
        ]
        if t.size_or_type == 0 and any(v.size for v in result):
            # clang leaves DATASEC size and offsets at 0; libbpf fixes them when it opens an object.
            raise BtfError(
                f"BTF of {self.source}: section {section} has no layout yet (raw clang output); "
                "fix: read it through Btf.parse() of the .bpf.o or BpfObject.btf",
                errno=_errno.EINVAL,
                func="btf__type_by_id",
            )
        return result
