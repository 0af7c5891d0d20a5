"""Thin, typed ctypes binding over the system libbpf (``libbpf.so.1``, libbpf 1.x).

This is the only module that touches libbpf through ctypes. It mirrors libbpf's
object model: :class:`BpfObject` (open -> set rodata / pin paths -> load),
:class:`Map`, :class:`Program`, :class:`Link`, plus :class:`Btf` for layout checks.

libbpf 1.x reports failure as a negative errno (or NULL with ``errno`` set); every
failure becomes a :class:`BpfError` subclass carrying ``errno``, the libbpf
function name, a message naming cause and fix, and the libbpf log captured while
the call ran (for a rejected program: the verifier log).

All calls block; callers that live on an event loop run them in a thread.
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import logging
import os
import platform
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

__all__ = [
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

_log = logging.getLogger(__name__)

LIBBPF_SONAME = "libbpf.so.1"


# --- constants (values from /usr/include/linux/bpf.h and linux/btf.h; checked by tests) ---


_E = TypeVar("_E", bound=enum.IntEnum)


def _unknown_member(cls: type[_E], value: object) -> _E | None:
    # A newer kernel may report a type these tables do not know: keep the number.
    if isinstance(value, int) and value >= 0:
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member
    return None


class ProgType(enum.IntEnum):
    """``enum bpf_prog_type``."""

    UNSPEC = 0
    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4
    TRACEPOINT = 5
    XDP = 6
    PERF_EVENT = 7
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    LWT_IN = 10
    LWT_OUT = 11
    LWT_XMIT = 12
    SOCK_OPS = 13
    SK_SKB = 14
    CGROUP_DEVICE = 15
    SK_MSG = 16
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    LWT_SEG6LOCAL = 19
    LIRC_MODE2 = 20
    SK_REUSEPORT = 21
    FLOW_DISSECTOR = 22
    CGROUP_SYSCTL = 23
    RAW_TRACEPOINT_WRITABLE = 24
    CGROUP_SOCKOPT = 25
    TRACING = 26
    STRUCT_OPS = 27
    EXT = 28
    LSM = 29
    SK_LOOKUP = 30
    SYSCALL = 31

    @classmethod
    def _missing_(cls, value: object) -> ProgType | None:
        return _unknown_member(cls, value)


class MapType(enum.IntEnum):
    """``enum bpf_map_type``."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31

    @classmethod
    def _missing_(cls, value: object) -> MapType | None:
        return _unknown_member(cls, value)


_PERCPU_MAP_TYPES = frozenset(
    {
        MapType.PERCPU_HASH,
        MapType.PERCPU_ARRAY,
        MapType.LRU_PERCPU_HASH,
        MapType.PERCPU_CGROUP_STORAGE,
    }
)


class AttachType(enum.IntEnum):
    """``enum bpf_attach_type``."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_PARSER = 4
    SK_SKB_STREAM_VERDICT = 5
    CGROUP_DEVICE = 6
    SK_MSG_VERDICT = 7
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_INET4_POST_BIND = 12
    CGROUP_INET6_POST_BIND = 13
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    LIRC_MODE2 = 16
    FLOW_DISSECTOR = 17
    CGROUP_SYSCTL = 18
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_SETSOCKOPT = 22
    TRACE_RAW_TP = 23
    TRACE_FENTRY = 24
    TRACE_FEXIT = 25
    MODIFY_RETURN = 26
    LSM_MAC = 27
    TRACE_ITER = 28
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET6_GETSOCKNAME = 32
    XDP_DEVMAP = 33
    CGROUP_INET_SOCK_RELEASE = 34
    XDP_CPUMAP = 35
    SK_LOOKUP = 36
    XDP = 37
    SK_SKB_VERDICT = 38
    SK_REUSEPORT_SELECT = 39
    SK_REUSEPORT_SELECT_OR_MIGRATE = 40
    PERF_EVENT = 41
    TRACE_KPROBE_MULTI = 42
    LSM_CGROUP = 43


class UpdateFlag(enum.IntEnum):
    """Flags of ``bpf_map_update_elem`` (``BPF_ANY`` ...)."""

    ANY = 0  # create or update
    NOEXIST = 1  # create only
    EXIST = 2  # update only
    LOCK = 4  # BPF_F_LOCK: spin-locked update/lookup


class AttachFlag(enum.IntFlag):
    """Flags of ``bpf_prog_attach`` (``BPF_F_ALLOW_OVERRIDE`` ...)."""

    NONE = 0
    ALLOW_OVERRIDE = 1 << 0
    ALLOW_MULTI = 1 << 1
    REPLACE = 1 << 2


class BtfKind(enum.IntEnum):
    """``BTF_KIND_*`` from linux/btf.h."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# enum libbpf_print_level
_LIBBPF_WARN = 0
_LIBBPF_INFO = 1
_LIBBPF_DEBUG = 2

_LIBBPF_ERRNO_START = 4000  # libbpf-specific codes (LIBBPF_ERRNO__LIBELF ...) start here
_ENOTSUPP = 524  # kernel-internal "not supported", leaks out of bpf()


# --- errors ---


class BpfError(Exception):
    """A libbpf or bpf() failure: ``errno``, libbpf ``func`` and the captured libbpf ``log``."""

    def __init__(self, message: str, *, errno: int, func: str, log: str = "") -> None:
        super().__init__(message)
        self.errno = errno
        self.func = func
        self.log = log


class ObjectOpenError(BpfError):
    """The ELF object is missing or not a usable BPF object."""


class LoadError(BpfError):
    """``bpf_object__load`` failed (map creation, pinned-map reuse, relocation ...)."""


class VerifierError(LoadError):
    """The kernel refused a program; ``log`` holds the verifier log."""


class AttachError(BpfError):
    """Attaching or detaching a program failed."""


class MapError(BpfError):
    """A map operation failed or was called with the wrong sizes or state."""


class PinError(BpfError):
    """Pinning, unpinning or opening a pin failed (or bpffs could not be mounted)."""


class BtfError(BpfError):
    """BTF could not be parsed or does not describe the requested type."""


# Generic cause and fix per errno; call sites override with what they know.
_HINTS: dict[int, tuple[str, str]] = {
    _errno.EPERM: (
        "the kernel refused the bpf() call for lack of privilege",
        "run as root (or with CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN), unblocked by seccomp",
    ),
    _errno.EACCES: ("access was denied", "run as root and check the path's permissions"),
    _errno.ENOENT: ("no such file, element or object", "check the path or name"),
    _errno.EINVAL: (
        "the kernel or libbpf rejected an argument",
        "check sizes, types and that the object is loaded",
    ),
    _errno.ENOMEM: (
        "the kernel could not allocate memory",
        "reduce max_entries, or raise RLIMIT_MEMLOCK on kernels older than 5.11",
    ),
    _errno.E2BIG: (
        "too big, or the map is full",
        "lower the size or raise max_entries",
    ),
    _errno.EEXIST: ("it already exists", "remove it first or reuse it"),
    _errno.EBUSY: ("it is busy or already loaded", "do this before BpfObject.load()"),
    _errno.EBADF: ("a file descriptor is not valid", "keep the object open while using its fds"),
    _errno.EOPNOTSUPP: (
        "the kernel does not support this",
        "use a kernel with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
    ),
    _ENOTSUPP: (
        "the kernel does not support this",
        "use a kernel with CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF",
    ),
}

_Hints = dict[int, tuple[str, str]]

_MESSAGE_LOG_TAIL = 6000  # characters of libbpf log kept in str(exception); .log has it all


def _strerror(err: int) -> str:
    if err >= _LIBBPF_ERRNO_START:
        buf = ctypes.create_string_buffer(256)
        _lib().libbpf_strerror(err, buf, len(buf))
        return buf.value.decode("utf-8", "replace")
    return os.strerror(err)


def _error(
    cls: type[BpfError],
    func: str,
    err: int,
    what: str,
    hints: _Hints | None = None,
    log: str = "",
) -> BpfError:
    cause, fix = (
        (hints or {}).get(err) or _HINTS.get(err) or ("unexpected error", "see the libbpf log")
    )
    message = f"{what}: {func}() failed: [errno {err}] {_strerror(err)}; cause: {cause}; fix: {fix}"
    if log:
        tail = log if len(log) <= _MESSAGE_LOG_TAIL else "...\n" + log[-_MESSAGE_LOG_TAIL:]
        message += "\n--- libbpf log ---\n" + tail.rstrip("\n")
    return cls(message, errno=err, func=func, log=log)


# --- loading libbpf and its print callback ---

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

_c_void_p = ctypes.c_void_p
_c_char_p = ctypes.c_char_p
_c_int = ctypes.c_int
_c_u32 = ctypes.c_uint32

# name -> (restype, argtypes), from /usr/include/bpf/{libbpf,bpf,btf}.h of libbpf 1.1.
_SIGNATURES: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "libbpf_set_print": (_c_void_p, (_PRINT_FN,)),
    "libbpf_strerror": (_c_int, (_c_int, _c_char_p, ctypes.c_size_t)),
    "libbpf_num_possible_cpus": (_c_int, ()),
    "libbpf_probe_bpf_prog_type": (_c_int, (_c_int, _c_void_p)),
    "libbpf_probe_bpf_map_type": (_c_int, (_c_int, _c_void_p)),
    "bpf_object__open_file": (_c_void_p, (_c_char_p, _c_void_p)),
    "bpf_object__load": (_c_int, (_c_void_p,)),
    "bpf_object__close": (None, (_c_void_p,)),
    "bpf_object__name": (_c_char_p, (_c_void_p,)),
    "bpf_object__btf": (_c_void_p, (_c_void_p,)),
    "bpf_object__next_map": (_c_void_p, (_c_void_p, _c_void_p)),
    "bpf_object__next_program": (_c_void_p, (_c_void_p, _c_void_p)),
    "bpf_map__name": (_c_char_p, (_c_void_p,)),
    "bpf_map__fd": (_c_int, (_c_void_p,)),
    "bpf_map__type": (_c_int, (_c_void_p,)),
    "bpf_map__key_size": (_c_u32, (_c_void_p,)),
    "bpf_map__value_size": (_c_u32, (_c_void_p,)),
    "bpf_map__max_entries": (_c_u32, (_c_void_p,)),
    "bpf_map__set_max_entries": (_c_int, (_c_void_p, _c_u32)),
    "bpf_map__set_pin_path": (_c_int, (_c_void_p, _c_char_p)),
    "bpf_map__pin_path": (_c_char_p, (_c_void_p,)),
    "bpf_map__pin": (_c_int, (_c_void_p, _c_char_p)),
    "bpf_map__unpin": (_c_int, (_c_void_p, _c_char_p)),
    "bpf_map__initial_value": (_c_void_p, (_c_void_p, ctypes.POINTER(ctypes.c_size_t))),
    "bpf_map__set_initial_value": (_c_int, (_c_void_p, _c_void_p, ctypes.c_size_t)),
    "bpf_map__is_internal": (ctypes.c_bool, (_c_void_p,)),
    "bpf_program__name": (_c_char_p, (_c_void_p,)),
    "bpf_program__fd": (_c_int, (_c_void_p,)),
    "bpf_program__type": (_c_int, (_c_void_p,)),
    "bpf_program__attach_cgroup": (_c_void_p, (_c_void_p, _c_int)),
    "bpf_program__pin": (_c_int, (_c_void_p, _c_char_p)),
    "bpf_program__unpin": (_c_int, (_c_void_p, _c_char_p)),
    "bpf_link__open": (_c_void_p, (_c_char_p,)),
    "bpf_link__fd": (_c_int, (_c_void_p,)),
    "bpf_link__pin": (_c_int, (_c_void_p, _c_char_p)),
    "bpf_link__unpin": (_c_int, (_c_void_p,)),
    "bpf_link__pin_path": (_c_char_p, (_c_void_p,)),
    "bpf_link__detach": (_c_int, (_c_void_p,)),
    "bpf_link__destroy": (_c_int, (_c_void_p,)),
    "bpf_obj_get": (_c_int, (_c_char_p,)),
    "bpf_obj_pin": (_c_int, (_c_int, _c_char_p)),
    # libbpf 1.1 has no bpf_map_get_info_by_fd (added in 1.2): use the generic one.
    "bpf_obj_get_info_by_fd": (_c_int, (_c_int, _c_void_p, ctypes.POINTER(_c_u32))),
    "bpf_prog_attach": (_c_int, (_c_int, _c_int, _c_int, ctypes.c_uint)),
    "bpf_prog_detach2": (_c_int, (_c_int, _c_int, _c_int)),
    "bpf_map_update_elem": (_c_int, (_c_int, _c_void_p, _c_void_p, ctypes.c_uint64)),
    "bpf_map_lookup_elem": (_c_int, (_c_int, _c_void_p, _c_void_p)),
    "bpf_map_delete_elem": (_c_int, (_c_int, _c_void_p)),
    "bpf_map_get_next_key": (_c_int, (_c_int, _c_void_p, _c_void_p)),
    "btf__parse": (_c_void_p, (_c_char_p, _c_void_p)),
    "btf__free": (None, (_c_void_p,)),
    "btf__find_by_name_kind": (ctypes.c_int32, (_c_void_p, _c_char_p, _c_u32)),
    "btf__type_by_id": (_c_void_p, (_c_void_p, _c_u32)),
    "btf__resolve_size": (ctypes.c_int64, (_c_void_p, _c_u32)),
    "btf__resolve_type": (_c_int, (_c_void_p, _c_u32)),
    "btf__name_by_offset": (_c_char_p, (_c_void_p, _c_u32)),
}

# x86_64 and aarch64 pass va_list by reference; copying its bytes is va_copy there,
# which lets us format a message a second time into a bigger buffer.
_VA_LIST_SIZE = {"x86_64": 24, "aarch64": 32}.get(platform.machine(), 0)
_FIRST_FORMAT_BUF = 4096
_FALLBACK_FORMAT_BUF = 1 << 16


class _Capture:
    """libbpf WARN/INFO messages printed while one call ran on this thread."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str]] = []

    def text(self) -> str:
        return "".join(text for _, text in self.records)

    def emit(self, *, failed: bool) -> None:
        # On failure the text travels in the exception: log it at debug only, once.
        for level, text in self.records:
            if failed:
                _log.debug("%s", text.rstrip("\n"))
            else:
                _emit(level, text)


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.captures: list[_Capture] = []
        self.last_failed_load_log = ""


_tls = _ThreadState()
_lib_lock = threading.Lock()
_lib_handle: ctypes.CDLL | None = None
_vsnprintf: Any = None
_print_callback: Any = None  # module-level: libbpf keeps the pointer, the GC must not free it
_cpus: int | None = None


def _emit(level: int, text: str) -> None:
    py_level = {_LIBBPF_WARN: logging.WARNING, _LIBBPF_INFO: logging.INFO}.get(level, logging.DEBUG)
    _log.log(py_level, "%s", text.rstrip("\n"))


def _format(fmt: int, ap: int) -> str:
    saved = (
        ctypes.create_string_buffer(ctypes.string_at(ap, _VA_LIST_SIZE)) if _VA_LIST_SIZE else None
    )
    size = _FIRST_FORMAT_BUF if saved is not None else _FALLBACK_FORMAT_BUF
    buf = ctypes.create_string_buffer(size)
    needed = int(_vsnprintf(buf, size, fmt, ap))
    if needed < 0:
        return "<unformattable libbpf message>\n"
    if needed >= size and saved is not None:
        # Truncated (a whole verifier log is one %s): format again from the copy.
        buf = ctypes.create_string_buffer(needed + 1)
        _vsnprintf(buf, needed + 1, fmt, ctypes.addressof(saved))
    return buf.value.decode("utf-8", "replace")


def _on_libbpf_print(level: int, fmt: int | None, ap: int | None) -> int:
    try:
        if fmt is None or ap is None:
            return 0
        if level >= _LIBBPF_DEBUG:
            # Debug output is large (every relocation): format it only when someone listens.
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug("%s", _format(fmt, ap).rstrip("\n"))
            return 0
        text = _format(fmt, ap)
        if _tls.captures:
            _tls.captures[-1].records.append((level, text))
        else:
            _emit(level, text)
    except Exception:  # an exception must never unwind into libbpf's C frames
        return 0
    return 0


def _lib() -> ctypes.CDLL:
    """libbpf.so.1 with every used function declared and our print callback installed."""
    global _lib_handle, _vsnprintf, _print_callback
    if _lib_handle is not None:
        return _lib_handle
    with _lib_lock:
        if _lib_handle is not None:
            return _lib_handle
        try:
            lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
            libc = ctypes.CDLL("libc.so.6")
        except OSError as exc:
            raise BpfError(
                f"cannot load {LIBBPF_SONAME}: {exc}; fix: install libbpf 1.x (Debian libbpf1)",
                errno=_errno.ENOENT,
                func="dlopen",
            ) from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as exc:
                raise BpfError(
                    f"{LIBBPF_SONAME} lacks {name}(); fix: install libbpf >= 1.1 (Debian libbpf1)",
                    errno=_errno.ENOSYS,
                    func=name,
                ) from exc
            fn.restype = restype
            fn.argtypes = argtypes
        vsnprintf = libc.vsnprintf
        vsnprintf.restype = ctypes.c_int
        # va_list decays to a pointer when passed (x86_64, aarch64): pass it through as-is.
        vsnprintf.argtypes = (_c_void_p, ctypes.c_size_t, _c_void_p, _c_void_p)
        _vsnprintf = vsnprintf
        _print_callback = _PRINT_FN(_on_libbpf_print)
        lib.libbpf_set_print(_print_callback)
        _lib_handle = lib
        return lib


@contextmanager
def _capturing() -> Iterator[_Capture]:
    capture = _Capture()
    _tls.captures.append(capture)
    try:
        yield capture
    finally:
        _tls.captures.pop()


def _call_int(func: str, *args: Any) -> tuple[int, str]:
    """Call an int-returning libbpf function; (rc, captured log). rc < 0 is -errno."""
    fn = getattr(_lib(), func)
    with _capturing() as capture:
        rc = int(fn(*args))
    capture.emit(failed=rc < 0)
    return rc, capture.text()


def _call_ptr(func: str, *args: Any) -> tuple[int | None, int, str]:
    """Call a pointer-returning libbpf function; (pointer or None, errno, captured log)."""
    fn = getattr(_lib(), func)
    with _capturing() as capture:
        ptr = fn(*args)
        err = ctypes.get_errno()
    capture.emit(failed=ptr is None)
    return (int(ptr) if ptr else None), (err or _errno.EINVAL), capture.text()


def last_failed_load_log() -> str:
    """libbpf log of the last failed :meth:`BpfObject.load` on this thread ("" if none)."""
    return _tls.last_failed_load_log


def possible_cpus() -> int:
    """``libbpf_num_possible_cpus()``: the number of slots in a per-CPU map value."""
    global _cpus
    if _cpus is None:
        n = int(_lib().libbpf_num_possible_cpus())
        if n <= 0:
            raise _error(BpfError, "libbpf_num_possible_cpus", -n, "count possible CPUs")
        _cpus = n
    return _cpus


def _probe(func: str, value: int, what: str) -> bool:
    rc, log = _call_int(func, value, None)
    if rc < 0:
        raise _error(BpfError, func, -rc, f"probe kernel support for {what}", None, log)
    return rc == 1


def probe_prog_type(prog_type: ProgType) -> bool:
    """Whether the kernel can load programs of ``prog_type`` (needs root)."""
    return _probe("libbpf_probe_bpf_prog_type", int(prog_type), f"program type {prog_type!r}")


def probe_map_type(map_type: MapType) -> bool:
    """Whether the kernel can create maps of ``map_type`` (needs root)."""
    return _probe("libbpf_probe_bpf_map_type", int(map_type), f"map type {map_type!r}")


def _path_arg(path: Path | str) -> bytes:
    return os.fsencode(os.fspath(path))


def _decode(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw is not None else ""


def _fd_kind(fd: int) -> str:
    """``bpf-map``, ``bpf-prog``, ``bpf_link`` ... from the fd's anon inode name."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return target.removeprefix("anon_inode:")


def _obj_get(path: Path | str, expected_kind: str, what: str) -> int:
    """``bpf_obj_get`` that checks the pinned object is a map/prog/link as expected."""
    rc, log = _call_int("bpf_obj_get", _path_arg(path))
    if rc < 0:
        raise _error(
            PinError,
            "bpf_obj_get",
            -rc,
            f"open pinned {what} {path}",
            {
                _errno.ENOENT: (
                    "nothing is pinned at this path",
                    "pin it first, or check the bpffs mount",
                ),
                _errno.EINVAL: (
                    "the path is not on a bpffs mount",
                    "use a path under a bpffs mount (ensure_bpffs())",
                ),
                _errno.EPERM: (
                    "the path is not on a bpffs mount, or no privilege",
                    "run as root; pin under bpffs",
                ),
            },
            log,
        )
    kind = _fd_kind(rc)
    if kind and kind != expected_kind:
        os.close(rc)
        raise PinError(
            f"open pinned {what} {path}: the pinned object is a {kind}, not a {expected_kind}; "
            "fix: use the matching from_pin()/open_pinned()",
            errno=_errno.EINVAL,
            func="bpf_obj_get",
        )
    return rc


def _pin_hints(path: Path | str) -> _Hints:
    return {
        _errno.EEXIST: (f"{path} already exists", "unpin the old object first or reuse it"),
        _errno.ENOENT: (
            f"the parent directory of {path} does not exist",
            "create it on the bpffs mount",
        ),
        _errno.EINVAL: (
            f"{path} is not on a bpffs mount",
            "pin under a bpffs mount (ensure_bpffs())",
        ),
        _errno.EPERM: (
            f"{path} is not on a bpffs mount, or no privilege",
            "run as root; pin under bpffs",
        ),
    }


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


# --- objects ---


class BpfObject:
    """An opened ``.bpf.o`` (``struct bpf_object``); close it (or use ``with``) exactly once."""

    def __init__(self, ptr: int, path: Path) -> None:
        """Wrap a ``struct bpf_object *``; use :meth:`open`."""
        self._ptr: int | None = ptr
        self.path = path
        self._loaded = False
        self._maps: dict[str, Map] = {}
        self._programs: dict[str, Program] = {}
        lib = _lib()
        cur = lib.bpf_object__next_map(ptr, None)
        while cur:
            m = Map(_ptr=int(cur), _owner=self)
            self._maps[m.name] = m
            cur = lib.bpf_object__next_map(ptr, cur)
        cur = lib.bpf_object__next_program(ptr, None)
        while cur:
            p = Program(_ptr=int(cur), _owner=self)
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
    def maps(self) -> list[Map]:
        """All maps in object order, including internal ones (``.rodata`` ...)."""
        self._checked()
        return list(self._maps.values())

    def map(self, name: str) -> Map:
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
    def programs(self) -> list[Program]:
        """All programs in object order."""
        self._checked()
        return list(self._programs.values())

    def program(self, name: str) -> Program:
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
        return Btf(int(ptr), source=str(self.path), owner=self) if ptr else None

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
        state = "closed" if self._ptr is None else ("loaded" if self._loaded else "opened")
        return f"<BpfObject {self.path} {state}>"


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


class Program:
    """A BPF program: one of a :class:`BpfObject` (``struct bpf_program *``) or an owned fd."""

    def __init__(
        self,
        *,
        _ptr: int | None = None,
        _owner: BpfObject | None = None,
        _fd: int | None = None,
        _pin_path: Path | None = None,
    ) -> None:
        """Internal; use :meth:`BpfObject.program` or :meth:`Program.from_pin`."""
        self._ptr = _ptr
        self._owner = _owner
        self._fd = _fd
        self._pin_path = _pin_path

    @classmethod
    def from_pin(cls, path: Path | str) -> Program:
        """Open a pinned program (``bpf_obj_get``); the returned Program owns the fd: close it."""
        return cls(_fd=_obj_get(path, "bpf-prog", "program"), _pin_path=Path(path))

    def _checked_ptr(self, func: str) -> int:
        if self._ptr is None or self._owner is None:
            raise BpfError(
                f"{func}: this program was opened from a pin and has no libbpf object; "
                "fix: use prog_attach() with its fd",
                errno=_errno.EINVAL,
                func=func,
            )
        if self._owner.closed:
            raise BpfError(
                f"program of closed object {self._owner.path}; fix: keep the BpfObject open",
                errno=_errno.EBADF,
                func=func,
            )
        return self._ptr

    @property
    def name(self) -> str:
        """The C function name (for pins: the kernel's 15-character name)."""
        if self._ptr is None:
            return self.info().name
        return _decode(_lib().bpf_program__name(self._checked_ptr("bpf_program__name")))

    @property
    def fd(self) -> int:
        """The program fd; object programs have one only after load."""
        if self._ptr is None:
            if self._fd is None:
                raise BpfError("program is closed", errno=_errno.EBADF, func="close")
            return self._fd
        fd = int(_lib().bpf_program__fd(self._checked_ptr("bpf_program__fd")))
        if fd < 0:
            raise BpfError(
                f"program {self.name!r} has no fd: its object is not loaded; fix: load() first",
                errno=_errno.EINVAL,
                func="bpf_program__fd",
            )
        return fd

    @property
    def prog_type(self) -> ProgType:
        """``enum bpf_prog_type`` (from the section name before load)."""
        if self._ptr is None:
            return self.info().prog_type
        return ProgType(int(_lib().bpf_program__type(self._checked_ptr("bpf_program__type"))))

    def info(self) -> ProgInfo:
        """``bpf_obj_get_info_by_fd``: type, id, tag, kernel name."""
        return _prog_info(self.fd, "read program info")

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        """``bpf_program__attach_cgroup``: a BPF link (multi-attach) to the cgroup dir fd."""
        ptr, err, log = _call_ptr(
            "bpf_program__attach_cgroup", self._checked_ptr("bpf_program__attach_cgroup"), cgroup_fd
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
        """Pin the loaded program at ``path`` on bpffs."""
        if self._ptr is None:
            rc, log = _call_int("bpf_obj_pin", self.fd, _path_arg(path))
            func = "bpf_obj_pin"
        else:
            rc, log = _call_int(
                "bpf_program__pin", self._checked_ptr("bpf_program__pin"), _path_arg(path)
            )
            func = "bpf_program__pin"
        if rc < 0:
            raise _error(
                PinError, func, -rc, f"pin program {self.name!r} at {path}", _pin_hints(path), log
            )
        self._pin_path = Path(path)

    def unpin(self, path: Path | str | None = None) -> None:
        """Remove the pin at ``path`` (default: where this program was pinned or opened)."""
        target = path if path is not None else self._pin_path
        if target is None:
            raise PinError(
                "program has no pin path; fix: pass the path to unpin()",
                errno=_errno.EINVAL,
                func="unlink",
            )
        if self._ptr is not None:
            ptr = self._checked_ptr("bpf_program__unpin")
            rc, log = _call_int("bpf_program__unpin", ptr, _path_arg(target))
            if rc < 0:
                raise _error(
                    PinError, "bpf_program__unpin", -rc, f"unpin program at {target}", None, log
                )
            return
        try:
            os.unlink(target)
        except OSError as exc:
            raise _error(
                PinError, "unlink", exc.errno or _errno.EIO, f"unpin program at {target}"
            ) from exc

    def close(self) -> None:
        """Close an owned fd (programs from :meth:`from_pin`)."""
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


class Link:
    """A BPF link (``struct bpf_link *``): the attachment lives while a handle or a pin holds it."""

    def __init__(self, ptr: int) -> None:
        """Wrap a ``struct bpf_link *``; use :meth:`Program.attach_cgroup`, :meth:`open_pinned`."""
        self._ptr: int | None = ptr

    @classmethod
    def open_pinned(cls, path: Path | str) -> Link:
        """``bpf_link__open``: a handle on a pinned link (its pin path is remembered for unpin)."""
        ptr, err, log = _call_ptr("bpf_link__open", _path_arg(path))
        if ptr is None:
            raise _error(
                PinError,
                "bpf_link__open",
                err,
                f"open pinned link {path}",
                {
                    _errno.ENOENT: (
                        "nothing is pinned at this path",
                        "check the path and the bpffs mount",
                    ),
                    _errno.EINVAL: (
                        "the pinned object is not a link",
                        "use Map.from_pin / Program.from_pin",
                    ),
                },
                log,
            )
        return cls(ptr)

    def _checked(self, func: str) -> int:
        if self._ptr is None:
            raise AttachError("link is destroyed", errno=_errno.EBADF, func=func)
        return self._ptr

    @property
    def fd(self) -> int:
        """The link fd."""
        return int(_lib().bpf_link__fd(self._checked("bpf_link__fd")))

    @property
    def pin_path(self) -> Path | None:
        """Where the link is pinned, if it is."""
        raw = _lib().bpf_link__pin_path(self._checked("bpf_link__pin_path"))
        return Path(os.fsdecode(raw)) if raw else None

    def info(self) -> LinkInfo:
        """``bpf_obj_get_info_by_fd``: link type, link id, program id."""
        info = _BpfLinkInfo()
        _get_info(self.fd, info, AttachError, "read link info")
        return LinkInfo(link_type=info.type, id=info.id, prog_id=info.prog_id)

    def pin(self, path: Path | str) -> None:
        """``bpf_link__pin``: keep the attachment after this process exits."""
        rc, log = _call_int("bpf_link__pin", self._checked("bpf_link__pin"), _path_arg(path))
        if rc < 0:
            raise _error(
                PinError, "bpf_link__pin", -rc, f"pin link at {path}", _pin_hints(path), log
            )

    def unpin(self) -> None:
        """``bpf_link__unpin``: remove the pin (the attachment then lives as long as the handle)."""
        rc, log = _call_int("bpf_link__unpin", self._checked("bpf_link__unpin"))
        if rc < 0:
            raise _error(
                PinError,
                "bpf_link__unpin",
                -rc,
                "unpin link",
                {_errno.EINVAL: ("the link is not pinned", "nothing to unpin")},
                log,
            )

    def detach(self) -> None:
        """``bpf_link__detach``: detach now, even while pinned (the handle stays; destroy it)."""
        rc, log = _call_int("bpf_link__detach", self._checked("bpf_link__detach"))
        if rc < 0:
            raise _error(AttachError, "bpf_link__detach", -rc, "detach link", None, log)

    def destroy(self) -> None:
        """``bpf_link__destroy`` (once): drop this handle; detaches unless pinned elsewhere."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            rc, log = _call_int("bpf_link__destroy", ptr)
            if rc < 0:
                raise _error(AttachError, "bpf_link__destroy", -rc, "destroy link", None, log)

    @property
    def destroyed(self) -> bool:
        """True after :meth:`destroy`."""
        return self._ptr is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()


def prog_attach(prog_fd: int, target_fd: int, attach_type: AttachType, flags: int = 0) -> None:
    """``bpf_prog_attach``: legacy attach, e.g. sk_msg to a SOCKHASH map fd with SK_MSG_VERDICT."""
    rc, log = _call_int("bpf_prog_attach", prog_fd, target_fd, int(attach_type), int(flags))
    if rc < 0:
        raise _error(
            AttachError,
            "bpf_prog_attach",
            -rc,
            f"attach program fd {prog_fd} to fd {target_fd} as {AttachType(attach_type).name}",
            {
                _errno.EINVAL: (
                    "the program type does not match the attach type or target",
                    "sk_msg programs attach to a SOCKMAP/SOCKHASH fd with SK_MSG_VERDICT",
                ),
                _errno.EEXIST: ("another program is already attached there", "detach it first"),
                _errno.EBUSY: ("another program is already attached there", "detach it first"),
            },
            log,
        )


def prog_detach(prog_fd: int, target_fd: int, attach_type: AttachType) -> None:
    """``bpf_prog_detach2``: undo :func:`prog_attach`."""
    rc, log = _call_int("bpf_prog_detach2", prog_fd, target_fd, int(attach_type))
    if rc < 0:
        raise _error(
            AttachError,
            "bpf_prog_detach2",
            -rc,
            f"detach program fd {prog_fd} from fd {target_fd} ({AttachType(attach_type).name})",
            {_errno.ENOENT: ("this program is not attached there", "nothing to detach")},
            log,
        )


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


class Btf:
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
                obj = BpfObject.open(path)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

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
