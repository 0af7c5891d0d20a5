"""Ask another process's sockets what they answer: its TCP connections, seen through copies of
its file descriptors (pidfd_getfd, Linux 5.6; needs ptrace rights over it: root here).

The copy is the same socket, so getsockname/getpeername/getsockopt run the same kernel code and
the same cgroup programs (those of the socket's cgroup) as when the owner asks. Used to read a
real Envoy's sockets, which no test can otherwise query.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from pathlib import Path

from .apps import socket_view

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _pidfd_getfd(pidfd: int, target_fd: int) -> int:
    fd = int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, target_fd, 0))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({target_fd}): {os.strerror(err)}")
    return fd


def tcp_connection_views(pid: int, family: int = socket.AF_INET) -> list[dict[str, str]]:
    """apps.socket_view of every connected TCP socket of ``family`` process ``pid`` holds."""
    views: list[dict[str, str]] = []
    pidfd = os.pidfd_open(pid)
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if not os.readlink(entry).startswith("socket:"):
                    continue
                fd = _pidfd_getfd(pidfd, int(entry.name))
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.EBADF):
                    continue  # closed since the listing
                raise
            with socket.socket(fileno=fd) as sock:
                if sock.family != family or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    views.append(socket_view(sock))
                except OSError as err:
                    if err.errno != errno.ENOTCONN:  # a listener
                        raise
    finally:
        os.close(pidfd)
    return views
