"""Test applications for netlab pods: a TCP echo server and clients. Standard library only.

Run by path (`python tests/netlab/apps.py ...`) or as `python -m tests.netlab.apps ...`.

  echo-server --port 8080 [--read-api recv] [--log FILE]
      Echo every byte back. On EOF from the peer, finish echoing, then shutdown(SHUT_WR).
      Read APIs: read (os.read), recv, recv_into, recvmsg, readinto (makefile), readv (os.readv),
      splice (os.splice socket -> pipe -> socket). One JSON line per event in --log
      ({"event": "listening"|"accept"|"close", "peer": "ip:port", "local": "ip:port", ...}).
  echo-client --host IP --port P --bytes N [--connections K] [--no-half-close]
      Send N deterministic pseudo-random bytes per connection while reading the echo concurrently,
      verify byte-exactness, print one JSON result line. Exit 0 only if every connection was exact.
  request --host IP --port P [--message TEXT]
      One-shot: send, half-close, read to EOF, print one JSON line with the response.

Every blocking call has a timeout. `--run-as UID:GID` makes a client drop root after start-up
(so the interpreter need not be reachable by that uid), e.g. to act as the sidecar's uid 1337.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

READ_APIS = ("read", "recv", "recv_into", "recvmsg", "readinto", "readv", "splice")
MAX_CONNECTIONS = 512
BUFFER_SIZE = 64 * 1024


def _addr(address: Any) -> str:
    return f"{address[0]}:{address[1]}"


def _set_io_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking fd (so os.read/readv/splice work) with kernel-side SO_RCVTIMEO/SO_SNDTIMEO."""
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


class EventLog:
    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._handle = open(path, "a", buffering=1) if path else None  # noqa: SIM115

    def write(self, **record: Any) -> None:
        line = json.dumps(record, sort_keys=True)
        with self._lock:
            if self._handle is not None:
                self._handle.write(line + "\n")
            else:
                print(line, flush=True)


# ---------------------------------------------------------------- echo server


def _echo_with_reads(conn: socket.socket, read: Callable[[], bytes | memoryview | None]) -> int:
    total = 0
    while True:
        data = read()
        if data is None:  # makefile().readinto returns None on EAGAIN, i.e. our SO_RCVTIMEO
            raise TimeoutError("read timed out")
        if not data:
            return total
        conn.sendall(data)
        total += len(data)


def _echo_with_splice(conn: socket.socket) -> int:
    pipe_read, pipe_write = os.pipe()
    total = 0
    try:
        while True:
            moved = os.splice(conn.fileno(), pipe_write, BUFFER_SIZE)
            if moved == 0:
                return total
            pending = moved
            while pending:
                pending -= os.splice(pipe_read, conn.fileno(), pending)
            total += moved
    finally:
        os.close(pipe_read)
        os.close(pipe_write)


def _echo(conn: socket.socket, read_api: str) -> int:
    fd = conn.fileno()
    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    if read_api == "splice":
        return _echo_with_splice(conn)
    if read_api == "read":
        return _echo_with_reads(conn, lambda: os.read(fd, BUFFER_SIZE))
    if read_api == "recv":
        return _echo_with_reads(conn, lambda: conn.recv(BUFFER_SIZE))
    if read_api == "recv_into":
        return _echo_with_reads(conn, lambda: view[: conn.recv_into(buffer)])
    if read_api == "recvmsg":
        return _echo_with_reads(conn, lambda: conn.recvmsg(BUFFER_SIZE)[0])
    if read_api == "readv":
        return _echo_with_reads(conn, lambda: view[: os.readv(fd, [buffer])])
    if read_api == "readinto":
        stream = conn.makefile("rb", buffering=0)

        def read_into() -> memoryview | None:
            count = stream.readinto(buffer)
            return None if count is None else view[:count]

        try:
            return _echo_with_reads(conn, read_into)
        finally:
            stream.close()
    raise ValueError(f"unknown read API {read_api!r}")


def serve_connection(
    conn: socket.socket, peer: str, args: argparse.Namespace, log: EventLog
) -> None:
    local = _addr(conn.getsockname())
    log.write(event="accept", peer=peer, local=local, read_api=args.read_api)
    started = time.monotonic()
    total, error = 0, None
    try:
        _set_io_timeouts(conn, args.io_timeout)
        total = _echo(conn, args.read_api)
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        log.write(
            event="close",
            peer=peer,
            local=local,
            bytes=total,
            error=error,
            seconds=round(time.monotonic() - started, 4),
        )


def run_echo_server(args: argparse.Namespace) -> int:
    log = EventLog(args.log)
    slots = threading.BoundedSemaphore(args.max_connections)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(1024)
    listener.settimeout(1.0)
    log.write(
        event="listening",
        local=_addr(listener.getsockname()),
        read_api=args.read_api,
        pid=os.getpid(),
    )
    deadline = time.monotonic() + args.lifetime if args.lifetime else None
    while deadline is None or time.monotonic() < deadline:
        try:
            conn, peer = listener.accept()
        except TimeoutError:
            continue
        if not slots.acquire(timeout=args.io_timeout):
            conn.close()
            continue

        def handle(conn: socket.socket = conn, peer: str = _addr(peer)) -> None:
            try:
                serve_connection(conn, peer, args, log)
            finally:
                slots.release()

        threading.Thread(target=handle, daemon=True).start()
    return 0


# ---------------------------------------------------------------- clients


class PseudoRandomStream:
    """Deterministic bytes: the same (seed, index) always yields the same stream, chunk by chunk."""

    def __init__(self, seed: int, index: int) -> None:
        self._random = random.Random(seed * 1_000_003 + index)
        self._pending = b""

    def take(self, count: int) -> bytes:
        while len(self._pending) < count:
            self._pending += self._random.randbytes(BUFFER_SIZE)
        data, self._pending = self._pending[:count], self._pending[count:]
        return data


def _connect(args: argparse.Namespace) -> socket.socket:
    sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def run_one_echo_connection(args: argparse.Namespace, index: int) -> dict[str, Any]:
    result: dict[str, Any] = {
        "index": index,
        "sent": 0,
        "received": 0,
        "exact": False,
        "error": None,
    }
    started = time.monotonic()
    try:
        sock = _connect(args)
    except OSError as exc:
        result["error"] = f"connect: {type(exc).__name__}: {exc}"
        return result
    result["local"], result["peer"] = _addr(sock.getsockname()), _addr(sock.getpeername())
    send_error: list[str] = []

    def send_all() -> None:
        stream = PseudoRandomStream(args.seed, index)
        try:
            remaining = args.bytes
            while remaining:
                chunk = stream.take(min(args.chunk, remaining))
                sock.sendall(chunk)
                remaining -= len(chunk)
                result["sent"] += len(chunk)
            if not args.no_half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_error.append(f"send: {type(exc).__name__}: {exc}")

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    expected = PseudoRandomStream(args.seed, index)
    mismatch_at = None
    try:
        with sock:
            while args.no_half_close is False or result["received"] < args.bytes:
                data = sock.recv(BUFFER_SIZE)
                if not data:
                    break
                if mismatch_at is None and data != expected.take(len(data)):
                    mismatch_at = result["received"]
                result["received"] += len(data)
                if result["received"] > args.bytes:
                    break
            sender.join(args.timeout)
    except OSError as exc:
        result["error"] = f"recv: {type(exc).__name__}: {exc}"
    if send_error and result["error"] is None:
        result["error"] = send_error[0]
    result["mismatch_at"] = mismatch_at
    result["exact"] = (
        result["error"] is None and mismatch_at is None and result["received"] == args.bytes
    )
    result["seconds"] = round(time.monotonic() - started, 4)
    return result


def run_echo_client(args: argparse.Namespace) -> int:
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        raise SystemExit(f"--connections must be within 1..{MAX_CONNECTIONS}")
    results: list[dict[str, Any]] = [{} for _ in range(args.connections)]

    def worker(index: int) -> None:
        results[index] = run_one_echo_connection(args, index)

    started = time.monotonic()
    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    deadline = started + args.timeout * 3
    for index, thread in enumerate(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            results[index] = {"index": index, "exact": False, "error": "timed out"}
    ok = all(r.get("exact") for r in results)
    summary = {
        "ok": ok,
        "uid": os.getuid(),
        "bytes_per_connection": args.bytes,
        "seconds": round(time.monotonic() - started, 4),
        "connections": results,
    }
    print(json.dumps(summary), flush=True)
    return 0 if ok else 1


def run_request(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"ok": False, "uid": os.getuid()}
    try:
        with _connect(args) as sock:
            result["local"], result["peer"] = _addr(sock.getsockname()), _addr(sock.getpeername())
            sock.sendall(args.message.encode())
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(BUFFER_SIZE):
                chunks.append(chunk)
        result["response"] = b"".join(chunks).decode(errors="replace")
        result["ok"] = True
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- command line


def _drop_privileges(spec: str | None) -> None:
    if not spec:
        return
    uid_text, _, gid_text = spec.partition(":")
    uid, gid = int(uid_text), int(gid_text or uid_text)
    # Load lazily imported modules while the stdlib is still readable (it may live under /root).
    "localhost".encode("idna")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("echo-server")
    server.add_argument("--host", default="0.0.0.0")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--read-api", choices=READ_APIS, default="recv")
    server.add_argument("--log", help="JSON-lines event log (default: stdout)")
    server.add_argument(
        "--io-timeout", type=float, default=30.0, help="per-connection idle timeout"
    )
    server.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    server.add_argument(
        "--lifetime", type=float, default=3600.0, help="exit after this many seconds (0 = never)"
    )
    server.set_defaults(handler=run_echo_server)

    for name, handler in (("echo-client", run_echo_client), ("request", run_request)):
        client = commands.add_parser(name)
        client.add_argument("--host", required=True)
        client.add_argument("--port", type=int, required=True)
        client.add_argument("--timeout", type=float, default=20.0)
        client.add_argument("--run-as", help="UID[:GID] to switch to before connecting")
        client.set_defaults(handler=handler)
        if name == "echo-client":
            client.add_argument("--bytes", type=int, default=1 << 20)
            client.add_argument("--connections", type=int, default=1)
            client.add_argument("--seed", type=int, default=1)
            client.add_argument("--chunk", type=int, default=BUFFER_SIZE)
            client.add_argument(
                "--no-half-close",
                action="store_true",
                help="close after reading N bytes instead of shutdown(SHUT_WR) + EOF",
            )
        else:
            client.add_argument("--message", default="ping")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _drop_privileges(getattr(args, "run_as", None))
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
