"""Network namespaces by name (`ip netns`), and sockets opened inside one from this process."""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .commands import run_command

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # <asm-generic/socket.h>, Linux 5.14+

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []


def create_netns(name: str) -> None:
    run_command(["ip", "netns", "add", name])


def delete_netns(name: str) -> None:
    if netns_exists(name):
        run_command(["ip", "netns", "delete", name])


def netns_exec_argv(name: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", name, *argv]


def run_in_netns(name: str, argv: list[str], *, timeout: float = 15.0, check: bool = True) -> str:
    """Run a tool (as root, in this process's cgroup) inside the netns; return its stdout."""
    return run_command(netns_exec_argv(name, argv), timeout=timeout, check=check).stdout


def call_in_netns(name: str, function: Callable[[], T], *, timeout: float = 10.0) -> T:
    """Call `function` on a short-lived thread that joined the netns (setns moves only it).

    Sockets created there stay in that netns for their whole life, whichever thread uses them later.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns({name}): {os.strerror(errno)}")
            finally:
                os.close(fd)
            result.append(function())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in netns {name} did not finish within {timeout}s")
    if error:
        raise error[0]
    return result[0]


def socket_in_netns(
    name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM, *, timeout: float = 5.0
) -> socket.socket:
    """A socket living in the named netns, owned by this process (uid 0, the runner's cgroup)."""
    sock = call_in_netns(name, lambda: socket.socket(family, kind))
    sock.settimeout(timeout)
    return sock


def netns_cookie(name: str) -> int:
    """The netns cookie (as bpf_get_netns_cookie returns) of the named netns."""
    with socket_in_netns(name) as sock:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, netns: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        timeout = self.timeout if isinstance(self.timeout, float | int) else 5.0
        self.sock = socket_in_netns(self._netns, timeout=timeout)
        self.sock.connect((self.host, self.port))


def http_get_in_netns(
    netns: str, host: str, port: int, path: str, *, timeout: float = 5.0
) -> tuple[int, str]:
    """GET http://host:port/path from a socket in the netns; returns (status, body text)."""
    connection = _NetnsHTTPConnection(netns, host, port, timeout)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()
