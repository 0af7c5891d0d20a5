"""libbpf.so.1 itself: loaded with typed signatures, its log routed to logging and into the
error of the call that produced it, and the small calls the object types share."""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .constants import _ENOTSUPP, _LIBBPF_DEBUG, _LIBBPF_ERRNO_START, _LIBBPF_INFO, _LIBBPF_WARN
from .errors import BpfError, PinError

if TYPE_CHECKING:
    from .constants import MapType, ProgType


_log = logging.getLogger("meshaccel.agent.libbpf")

LIBBPF_SONAME = "libbpf.so.1"


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
