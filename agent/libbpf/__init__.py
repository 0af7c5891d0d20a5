"""Thin, typed ctypes binding over the system libbpf (``libbpf.so.1``, libbpf 1.x).

This is the only package that touches libbpf through ctypes. It mirrors libbpf's
object model: :class:`BpfObject` (open -> set rodata / pin paths -> load),
:class:`Map`, :class:`Program`, :class:`Link`, plus :class:`Btf` for layout checks.

libbpf 1.x reports failure as a negative errno (or NULL with ``errno`` set); every
failure becomes a :class:`BpfError` subclass carrying ``errno``, the libbpf
function name, a message naming cause and fix, and the libbpf log captured while
the call ran (for a rejected program: the verifier log).

All calls block; callers that live on an event loop run them in a thread.

Modules: ``native`` (the library, its log, the calls everything shares), ``errors``,
``constants``, ``objects`` (BpfObject, Program, legacy attach), ``maps``, ``links``,
``info`` and ``btf``. Callers import from the package.
"""

from .btf import BitfieldLayout, Btf, DatasecVar, FieldLayout, StructLayout
from .constants import AttachFlag, AttachType, BtfKind, MapType, ProgType, UpdateFlag
from .errors import (
    AttachError,
    BpfError,
    BtfError,
    LoadError,
    MapError,
    ObjectOpenError,
    PinError,
    VerifierError,
)
from .info import LinkInfo, MapInfo, ProgInfo
from .links import Link
from .maps import Map
from .native import (
    LIBBPF_SONAME,
    last_failed_load_log,
    possible_cpus,
    probe_map_type,
    probe_prog_type,
)
from .objects import BpfObject, Program, prog_attach, prog_detach

__all__ = [
    "LIBBPF_SONAME",
    "AttachError",
    "AttachFlag",
    "AttachType",
    "BitfieldLayout",
    "BpfError",
    "BpfObject",
    "Btf",
    "BtfError",
    "BtfKind",
    "DatasecVar",
    "FieldLayout",
    "Link",
    "LinkInfo",
    "LoadError",
    "Map",
    "MapError",
    "MapInfo",
    "MapType",
    "ObjectOpenError",
    "PinError",
    "ProgInfo",
    "ProgType",
    "Program",
    "StructLayout",
    "UpdateFlag",
    "VerifierError",
    "last_failed_load_log",
    "possible_cpus",
    "probe_map_type",
    "probe_prog_type",
    "prog_attach",
    "prog_detach",
]
