"""A kernel program through an fd opened from its pin, and the legacy (non-link) attach."""

from __future__ import annotations

import errno as _errno
from pathlib import Path
from typing import TYPE_CHECKING

from .constants import AttachType
from .errors import AttachError
from .handles import FdHandle
from .info import _prog_info
from .native import _call_int, _error, _obj_get

if TYPE_CHECKING:
    from .info import ProgInfo


class Program(FdHandle):
    """A kernel program through an owned fd, from :meth:`from_pin`; close it. (A program of an
    opened object is an :class:`ObjectProgram`.)"""

    @classmethod
    def from_pin(cls, path: Path | str) -> Program:
        """Open a pinned program (``bpf_obj_get``); the returned Program owns the fd: close it."""
        fd = _obj_get(path, "bpf-prog", "program")
        return cls(fd, label=f"program pinned at {path}", pin_path=Path(path))

    def info(self) -> ProgInfo:
        """``bpf_obj_get_info_by_fd``: type, id, tag, kernel name (15 characters)."""
        return _prog_info(self.fd, f"read info of {self._label}")

    def __repr__(self) -> str:
        return f"<Program pin={self._pin_path}{' closed' if self.closed else ''}>"


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
