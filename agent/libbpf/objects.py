"""A ``.bpf.o`` object and its programs: open, prepare, load, attach, pin."""

from __future__ import annotations

import errno as _errno
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from . import btf as _btf
from .constants import _LIBBPF_ERRNO_START, AttachType, ProgType
from .errors import (
    AttachError,
    BpfError,
    LoadError,
    MapError,
    ObjectOpenError,
    PinError,
    VerifierError,
)
from .info import _prog_info
from .links import Link
from .maps import Map
from .native import (
    _HINTS,
    _call_int,
    _call_ptr,
    _decode,
    _error,
    _lib,
    _obj_get,
    _path_arg,
    _pin_hints,
    _tls,
)

if TYPE_CHECKING:
    from .btf import Btf
    from .info import ProgInfo


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
