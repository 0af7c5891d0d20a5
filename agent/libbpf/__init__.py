"""Thin, typed ctypes binding over the system libbpf (``libbpf.so.1``, libbpf 1.x).

This is the only package that touches libbpf through ctypes. It mirrors libbpf's
object model, with a type for each side of load: :class:`BpfObject` (open -> set rodata /
pin paths -> load) and its :class:`ObjectMap` and :class:`ObjectProgram`; the kernel objects
reached through an fd, :class:`Map` (from a pin, or :meth:`ObjectMap.handle` after load) and
:class:`Program` (from a pin); :class:`Link`; plus :class:`Btf` for layout checks.

libbpf 1.x reports failure as a negative errno (or NULL with ``errno`` set); every
failure becomes a :class:`BpfError` subclass carrying ``errno``, the libbpf
function name, a message naming cause and fix, and the libbpf log captured while
the call ran (for a rejected program: the verifier log).

All calls block; callers that live on an event loop run them in a thread.

Modules: ``native`` (the library, its log, the calls everything shares), ``errors``,
``constants``, ``objects`` (BpfObject, ObjectMap, ObjectProgram), ``handles`` (what an
fd-backed map or program shares), ``maps`` (Map), ``programs`` (Program, legacy attach),
``links``, ``info``, ``btf``, and ``introspect`` (libbpf's version, helper probes, the
programs attached to a cgroup: the checks' questions, imported as the module). Callers import
from the package.
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
from .handles import FdHandle
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
from .objects import BpfObject, ObjectMap, ObjectProgram
from .programs import Program, prog_attach, prog_detach

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
    "FdHandle",
    "FieldLayout",
    "Link",
    "LinkInfo",
    "LoadError",
    "Map",
    "MapError",
    "MapInfo",
    "MapType",
    "ObjectMap",
    "ObjectOpenError",
    "ObjectProgram",
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
