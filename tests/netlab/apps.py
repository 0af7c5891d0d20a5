"""Test applications for netlab pods: a TCP echo server and clients. Standard library only.

Run by path (`python tests/netlab/apps.py ...`) or as `python -m tests.netlab.apps ...`.

  echo-server --port 8080 [--host 0.0.0.0] [--host6 ::] [--read-api recv] [--log FILE]
      Echo every byte back. On EOF from the peer, finish echoing, then shutdown(SHUT_WR).
      Listens on --host (IPv4) and on --host6 with an IPv6-only socket ('' for none), so that
      an IPv4 connection keeps its AF_INET socket in a dual-stack pod.
      Read APIs: read (os.read), recv, recv_into, recvmsg, readinto (makefile), readv (os.readv),
      splice (os.splice socket -> pipe -> socket). One JSON line per event in --log
      ({"event": "listening"|"accept"|"close", "peer": "ip:port", "local": "ip:port", ...}).
  echo-client --host IP --port P --bytes N [--connections K] [--no-half-close]
              [--pace-seconds S [--pace-chunks C]] [--reset-after M] [--progress]
      Send N deterministic pseudo-random bytes per connection while reading the echo concurrently,
      verify byte-exactness, print one JSON result line. Exit 0 only if every connection was exact.
      --pace-seconds: send the bytes in C (default 50) chunks spread evenly over S seconds, so
      each connection (each in its own thread) stays open for at least S seconds; each
      connection's result counts the "chunks" it sent.
      --reset-after M (M <= N): send M bytes, wait until all M are echoed and verified, then
      SO_LINGER {1, 0} + close(), i.e. an RST; the result says "reset": true, "verified": bytes,
      "left_behind": the states of sockets the close left in the netns (an RST leaves none).
      --progress: also print JSON event lines before the result ({"event": "connected", ...},
      {"event": "echoed", "index": i, "received": n}); the result is the last line without "event".
  rr-client --host IP --port P [--connections K] [--duration S] [--size B] [--plan CxR,...]
      Request/response load from K workers for S seconds: each request is B bytes sent, then the
      same B bytes read back from the echo server and compared. A worker keeps one connection;
      with --plan it makes C connections of R requests each, one after the other, then those of
      the plan's next step, and stops at the plan's end. Prints one JSON line:
      {"requests", "connections", "seconds", "rps", "p50_us", "p90_us", "p99_us", "errors"}.
  request --host IP --port P [--message TEXT]
      One-shot: send, half-close, read to EOF, print one JSON line with the response.
  socket-view-client --host IP --port P --hold-file PATH [--run-as UID:GID]
      Connect, have one line echoed, print one JSON line {"event": "connected", "view": ...}
      (what the socket answers: see socket_view), keep the connection open until PATH exists,
      close, print {"closed": true}. The echo server's "accept" events carry the same view.
  getsockopt-probe [--family ipv4|ipv6] [--run-as UID:GID]
      A fixed battery of getsockopt(2) calls (through libc, to see optlen and errno exactly) on
      sockets it makes itself: a loopback TCP pair on 127.0.0.1 (::1) in the current netns, a UDP
      socket, an AF_UNIX socketpair made after setgroups() with GROUPS_FOR_PEERGROUPS groups
      (SO_PEERGROUPS > PAGE_SIZE). Prints ONE JSON object {case: {"ok", "len", "hex", "errno"}}
      that is identical between runs in the same context (varying values are masked or left out).

Every client takes an IPv4 or an IPv6 address as --host (an IPv6 socket for the latter); every
address printed is "ip:port", an IPv6 one "[ip]:port" as Envoy prints it.

Every blocking call has a timeout. `--run-as UID:GID` makes a client drop root after start-up
(so the interpreter need not be reachable by that uid), e.g. to act as the sidecar's uid 1337.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import json
import math
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

READ_APIS = ("read", "recv", "recv_into", "recvmsg", "readinto", "readv", "splice")
MAX_CONNECTIONS = 512
BUFFER_SIZE = 64 * 1024


def _addr(address: Any) -> str:
    """ "ip:port" of a socket address; an IPv6 one in brackets, as Envoy prints it."""
    host = str(address[0])
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


def _family(host: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, else AF_INET (the lab names every peer by address)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


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


def _no_pause() -> None:
    pass


def _echo_with_reads(
    conn: socket.socket,
    read: Callable[[], bytes | memoryview | None],
    echoed: list[int],
    pause: Callable[[], None],
) -> None:
    while True:
        data = read()
        pause()
        if data is None:  # makefile().readinto returns None on EAGAIN, i.e. our SO_RCVTIMEO
            raise TimeoutError("read timed out")
        if not data:
            return
        conn.sendall(data)
        echoed[0] += len(data)


def _echo_with_splice(conn: socket.socket, echoed: list[int], pause: Callable[[], None]) -> None:
    pipe_read, pipe_write = os.pipe()
    try:
        while True:
            moved = os.splice(conn.fileno(), pipe_write, BUFFER_SIZE)
            pause()
            if moved == 0:
                return
            pending = moved
            while pending:
                spliced = os.splice(pipe_read, conn.fileno(), pending)
                pending -= spliced
                echoed[0] += spliced
    finally:
        os.close(pipe_read)
        os.close(pipe_write)


def _echo(
    conn: socket.socket, read_api: str, echoed: list[int], pause: Callable[[], None] = _no_pause
) -> None:
    """Echo until EOF; echoed[0] counts the bytes sent back (also when an error ends it).
    ``pause`` runs after every read (a reader slower than its sender sleeps there)."""
    fd = conn.fileno()
    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    if read_api == "splice":
        return _echo_with_splice(conn, echoed, pause)
    if read_api == "read":
        return _echo_with_reads(conn, lambda: os.read(fd, BUFFER_SIZE), echoed, pause)
    if read_api == "recv":
        return _echo_with_reads(conn, lambda: conn.recv(BUFFER_SIZE), echoed, pause)
    if read_api == "recv_into":
        return _echo_with_reads(conn, lambda: view[: conn.recv_into(buffer)], echoed, pause)
    if read_api == "recvmsg":
        return _echo_with_reads(conn, lambda: conn.recvmsg(BUFFER_SIZE)[0], echoed, pause)
    if read_api == "readv":
        return _echo_with_reads(conn, lambda: view[: os.readv(fd, [buffer])], echoed, pause)
    if read_api == "readinto":
        stream = conn.makefile("rb", buffering=0)

        def read_into() -> memoryview | None:
            count = stream.readinto(buffer)
            return None if count is None else view[:count]

        try:
            return _echo_with_reads(conn, read_into, echoed, pause)
        finally:
            stream.close()
    raise ValueError(f"unknown read API {read_api!r}")


def serve_connection(
    conn: socket.socket, peer: str, args: argparse.Namespace, log: EventLog
) -> None:
    local = _addr(conn.getsockname())
    log.write(
        event="accept", peer=peer, local=local, read_api=args.read_api, view=socket_view(conn)
    )
    started = time.monotonic()
    echoed: list[int] = [0]
    error, error_errno = None, None
    try:
        _set_io_timeouts(conn, args.io_timeout)
        pause = partial(time.sleep, args.read_pause) if args.read_pause > 0 else _no_pause
        _echo(conn, args.read_api, echoed, pause)
        conn.shutdown(socket.SHUT_WR)
    except OSError as exc:  # e.g. ECONNRESET from a peer that reset: log it, keep serving others
        error, error_errno = f"{type(exc).__name__}: {exc}", exc.errno
    finally:
        conn.close()
        log.write(
            event="close",
            peer=peer,
            local=local,
            bytes=echoed[0],
            error=error,
            errno=error_errno,
            seconds=round(time.monotonic() - started, 4),
        )


def _listen(host: str, port: int) -> socket.socket:
    listener = socket.socket(_family(host), socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if listener.family == socket.AF_INET6:  # IPv4 keeps its own AF_INET listener and sockets
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    listener.bind((host, port))
    listener.listen(1024)
    listener.settimeout(1.0)  # accepted sockets start blocking, as they always have
    return listener


def run_echo_server(args: argparse.Namespace) -> int:
    log = EventLog(args.log)
    slots = threading.BoundedSemaphore(args.max_connections)
    listeners = [_listen(args.host, args.port)]
    if args.host6 and socket.has_ipv6:
        listeners.append(_listen(args.host6, args.port))
    log.write(
        event="listening",
        local=_addr(listeners[0].getsockname()),
        locals=[_addr(listener.getsockname()) for listener in listeners],
        read_api=args.read_api,
        pid=os.getpid(),
    )
    deadline = time.monotonic() + args.lifetime if args.lifetime else None
    while deadline is None or time.monotonic() < deadline:
        ready, _, _ = select.select(listeners, [], [], 1.0)
        for listener in ready:
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, TimeoutError):
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


_print_lock = threading.Lock()


def _print_json(record: dict[str, Any]) -> None:
    line = json.dumps(record)
    with _print_lock:
        print(line, flush=True)


def _progress(args: argparse.Namespace, **event: Any) -> None:
    if args.progress:
        _print_json(event)


def _connect(args: argparse.Namespace) -> socket.socket:
    if not getattr(args, "source_port", 0):
        sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
    else:
        # A fixed source port (one connection) lets a test reproduce a given 4-tuple, also
        # while an earlier connection from that port is in TIME_WAIT.
        sock = socket.socket(_family(args.host), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(args.timeout)
        sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", args.source_port))
        sock.connect((args.host, args.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _pace_gap(args: argparse.Namespace) -> float:
    return args.pace_seconds / args.pace_chunks if args.pace_seconds > 0 else 0.0


def send_plan(args: argparse.Namespace, total: int) -> list[tuple[float, int]]:
    """(offset in seconds from the start, chunk size) for every chunk to send."""
    if args.pace_seconds <= 0:
        plan, remaining = [], total
        while remaining:
            plan.append((0.0, min(args.chunk, remaining)))
            remaining -= plan[-1][1]
        return plan
    count = min(args.pace_chunks, total)
    size = math.ceil(total / count) if count else 0
    plan, remaining = [], total
    for i in range(count):
        plan.append((i * _pace_gap(args), min(size, remaining)))
        remaining -= plan[-1][1]
    return [(offset, size) for offset, size in plan if size]


def send_on_plan(
    send: Callable[[int], None],
    plan: Sequence[tuple[float, int]],
    *,
    started: float,
    hold: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """``send(size)`` each chunk of ``plan`` (see :func:`send_plan`), none before ``started +``
    its offset on ``clock``; then wait until ``started + hold`` (a paced connection stays open
    for its whole pace). A sender that runs late sends at once: it never sleeps to catch up."""
    for offset, size in plan:
        delay = started + offset - clock()
        if delay > 0:
            sleep(delay)
        send(size)
    rest = started + hold - clock()
    if rest > 0:
        sleep(rest)


def _proc_net_address(address: str) -> str:
    """An "ip:port" as /proc/net/tcp(6) spells it: the address in 32-bit words, each in host
    order, in hex."""
    ip, _, port = address.rpartition(":")
    ip = ip.strip("[]")
    packed = socket.inet_pton(_family(ip), ip)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{int(port):04X}"


def _from_proc_net(field: str) -> str:
    hex_ip, _, hex_port = field.partition(":")
    words = [int(hex_ip[i : i + 8], 16) for i in range(0, len(hex_ip), 8)]
    packed = struct.pack(f"={len(words)}I", *words)
    family = socket.AF_INET6 if len(packed) == 16 else socket.AF_INET
    return _addr((socket.inet_ntop(family, packed), int(hex_port, 16)))


def _proc_net_tcp(family: int) -> str:
    return "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"


def kernel_tuple(sock: socket.socket) -> tuple[str, str]:
    """(local, peer) of a TCP socket as the kernel holds them (/proc/net/tcp or tcp6, found by
    the socket's inode), which no socket call shows once meshaccel's address programs answer
    getsockname/getpeername as under iptables: 127.0.0.1 (::1) on both ends when connect4
    (connect6) steered it."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    table_path = _proc_net_tcp(sock.family)
    with open(table_path, encoding="utf-8") as table:  # loaded: ascii may not be after --run-as
        for row in (line.split() for line in table.readlines()[1:]):
            if len(row) > 9 and row[9] == inode:
                return _from_proc_net(row[1]), _from_proc_net(row[2])
    raise LookupError(f"socket inode {inode} is not in {table_path}")


def _tcp_states(local: str, peer: str) -> list[str]:
    """States of this netns's TCP sockets from ``local`` to ``peer``, from /proc/net/tcp(6)
    (hex codes: "04" FIN_WAIT1, "06" TIME_WAIT, ...). After an RST close there are none."""
    wanted = (_proc_net_address(local), _proc_net_address(peer))
    family = socket.AF_INET6 if local.startswith("[") else socket.AF_INET
    with open(_proc_net_tcp(family), encoding="ascii") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [row[3] for row in rows if len(row) > 3 and (row[1], row[2]) == wanted]


def run_one_echo_connection(args: argparse.Namespace, index: int) -> dict[str, Any]:
    resetting = args.reset_after is not None
    target = args.reset_after if resetting else args.bytes  # bytes to send (and see echoed)
    result: dict[str, Any] = {
        "index": index,
        "sent": 0,
        "chunks": 0,
        "received": 0,
        "exact": False,
        "error": None,
    }
    started = time.monotonic()
    try:
        sock = _connect(args)
    except OSError as exc:
        result["error"] = f"connect: {type(exc).__name__}: {exc}"
        _progress(args, event="connect_failed", index=index, error=result["error"])
        return result
    if args.pace_seconds > 0:  # a paced receiver idles up to one gap between chunks
        sock.settimeout(args.timeout + _pace_gap(args))
    result["local"], result["peer"] = _addr(sock.getsockname()), _addr(sock.getpeername())
    result["kernel_local"], result["kernel_peer"] = kernel_tuple(sock)
    _progress(
        args,
        event="connected",
        index=index,
        local=result["local"],
        peer=result["peer"],
        kernel_local=result["kernel_local"],
    )
    send_error: list[str] = []

    def send_all() -> None:
        stream = PseudoRandomStream(args.seed, index)

        def send(size: int) -> None:
            sock.sendall(stream.take(size))
            result["sent"] += size
            result["chunks"] += 1

        try:
            send_on_plan(send, send_plan(args, target), started=started, hold=args.pace_seconds)
            if not (args.no_half_close or resetting):
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            send_error.append(f"send: {type(exc).__name__}: {exc}")

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    expected = PseudoRandomStream(args.seed, index)
    mismatch_at = None
    stop_at_target = args.no_half_close or resetting
    mark_every = max(1, math.ceil(target / args.pace_chunks)) if args.pace_seconds > 0 else None
    next_mark = mark_every
    try:
        with sock:
            while not stop_at_target or result["received"] < target:
                data = sock.recv(BUFFER_SIZE)
                if not data:
                    break
                if mismatch_at is None and data != expected.take(len(data)):
                    mismatch_at = result["received"]
                result["received"] += len(data)
                while next_mark is not None and mark_every and result["received"] >= next_mark:
                    _progress(args, event="echoed", index=index, received=result["received"])
                    next_mark += mark_every
                if result["received"] > target:
                    break
            sender.join(args.timeout + args.pace_seconds)
            if resetting:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                closing = time.monotonic()
                sock.close()  # linger {1, 0}: the kernel sends an RST instead of a FIN
                result["reset"] = True
                result["close_seconds"] = round(time.monotonic() - closing, 4)  # a figure
                # A FIN close would leave the socket behind (FIN_WAIT1, ...); an RST, nothing.
                result["left_behind"] = _tcp_states(result["kernel_local"], result["kernel_peer"])
    except OSError as exc:
        result["error"] = f"recv: {type(exc).__name__}: {exc}"
    if send_error and result["error"] is None:
        result["error"] = send_error[0]
    result["mismatch_at"] = mismatch_at
    result["verified"] = result["received"] if mismatch_at is None else mismatch_at
    result["exact"] = (
        result["error"] is None
        and mismatch_at is None
        and result["received"] == target
        and (not resetting or (result.get("reset") is True and result["left_behind"] == []))
    )
    result["seconds"] = round(time.monotonic() - started, 4)
    return result


def run_echo_client(args: argparse.Namespace) -> int:
    if not 1 <= args.connections <= MAX_CONNECTIONS:
        raise SystemExit(f"--connections must be within 1..{MAX_CONNECTIONS}")
    if args.bytes < 0 or args.chunk < 1:
        raise SystemExit("--bytes must be >= 0 and --chunk >= 1")
    if not 0 <= args.pace_seconds <= 3600 or not 1 <= args.pace_chunks <= 10_000:
        raise SystemExit("--pace-seconds must be within 0..3600 and --pace-chunks 1..10000")
    if args.reset_after is not None and not 0 <= args.reset_after <= args.bytes:
        raise SystemExit("--reset-after must be within 0..--bytes")
    results: list[dict[str, Any]] = [{} for _ in range(args.connections)]

    def worker(index: int) -> None:
        results[index] = run_one_echo_connection(args, index)

    started = time.monotonic()
    threads = [
        threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.connections)
    ]
    for thread in threads:
        thread.start()
    deadline = started + args.pace_seconds + args.timeout * 3
    for index, thread in enumerate(threads):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            results[index] = {"index": index, "exact": False, "error": "timed out"}
    ok = all(r.get("exact") for r in results)
    summary = {
        "ok": ok,
        "uid": os.getuid(),
        "bytes_per_connection": args.bytes,
        "pace_seconds": args.pace_seconds,
        "reset": args.reset_after is not None,
        "reset_after": args.reset_after,
        "seconds": round(time.monotonic() - started, 4),
        "connections": results,
    }
    _print_json(summary)
    return 0 if ok else 1


def run_request(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"ok": False, "uid": os.getuid()}
    try:
        with _connect(args) as sock:
            result["local"], result["peer"] = _addr(sock.getsockname()), _addr(sock.getpeername())
            result["kernel_local"], _ = kernel_tuple(sock)
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


def _percentile(sorted_values: list[int], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))] / 1000


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    parts: list[bytes] = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("peer closed mid-response")
        parts.append(chunk)
        size -= len(chunk)
    return b"".join(parts)


def connection_plan(text: str) -> list[tuple[int, int]]:
    """``--plan``: "40x1,20x2" is 40 connections of one request each, then 20 of two."""
    plan = []
    for step in text.split(","):
        connections, _, requests = step.strip().partition("x")
        try:
            plan.append((int(connections), int(requests)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{step!r} is not CONNECTIONSxREQUESTS") from None
        if min(plan[-1]) < 1:
            raise argparse.ArgumentTypeError(f"{step!r}: both counts must be positive")
    return plan


def run_rr_client(args: argparse.Namespace) -> int:
    payload = bytes(random.Random(args.seed).getrandbits(8) for _ in range(args.size))
    latencies_ns: list[list[int]] = [[] for _ in range(args.connections)]
    errors: list[str] = []
    opened = [0] * args.connections  # connections each worker made
    deadline = time.monotonic() + args.duration

    # Without a plan, a worker keeps one connection for the whole run.
    plan: list[tuple[int, int]] = args.plan or [(1, sys.maxsize)]

    def transact(sock: socket.socket, index: int) -> bool:
        started = time.perf_counter_ns()
        sock.sendall(payload)
        if receive_exactly(sock, len(payload)) != payload:
            errors.append("the answer differs from the request")
            return False
        latencies_ns[index].append(time.perf_counter_ns() - started)
        return True

    def worker(index: int) -> None:
        try:
            for connections, per_connection in plan:
                for _ in range(connections):
                    if time.monotonic() >= deadline:
                        return
                    with _connect(args) as sock:
                        opened[index] += 1
                        for _ in range(per_connection):
                            if time.monotonic() >= deadline or not transact(sock, index):
                                return
        except OSError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.duration + args.timeout)
    seconds = time.monotonic() - started
    merged = sorted(value for per_worker in latencies_ns for value in per_worker)
    result = {
        "requests": len(merged),
        "connections": sum(opened),
        "seconds": round(seconds, 3),
        "rps": round(len(merged) / seconds, 1),
        "p50_us": _percentile(merged, 0.50),
        "p90_us": _percentile(merged, 0.90),
        "p99_us": _percentile(merged, 0.99),
        "errors": errors,
    }
    print(json.dumps(result), flush=True)
    return 0 if not errors else 1


# ---------------------------------------------------------------- getsockopt probe

SOL_IP = 0
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_DOMAIN = getattr(socket, "SO_DOMAIN", 39)
SO_PROTOCOL = getattr(socket, "SO_PROTOCOL", 38)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_INFO = getattr(socket, "TCP_INFO", 11)
PAGE_SIZE = 4096
BIG_BUFFER = 2 * PAGE_SIZE  # optlen > PAGE_SIZE: the cgroup getsockopt hook's special case
# > 1024 groups * 4 bytes > PAGE_SIZE; fixed gids so the answer is identical between runs.
GROUPS_FOR_PEERGROUPS = tuple(range(200_000, 201_200))
HEX_LIMIT = 256  # longer answers are recorded as a sha256 of the returned bytes

_libc: Any = None


def _getsockopt(fd: int, level: int, optname: int, buflen: int) -> tuple[int, int, bytes]:
    """libc getsockopt with a zeroed buffer of `buflen`: (errno or 0, returned optlen, bytes)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.getsockopt.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
        ]
        _libc.getsockopt.restype = ctypes.c_int
    buffer = ctypes.create_string_buffer(max(buflen, 1))
    optlen = ctypes.c_uint32(buflen)
    ctypes.set_errno(0)
    rc = _libc.getsockopt(fd, level, optname, buffer, ctypes.byref(optlen))
    error = ctypes.get_errno() if rc != 0 else 0
    return error, optlen.value, buffer.raw[: min(optlen.value, buflen)]


def _probe_case(
    sock: socket.socket,
    level: int,
    optname: int,
    buflen: int,
    *,
    keep_value: bool = True,
    mask_port: int | None = None,
) -> dict[str, Any]:
    """One case. keep_value=False: only ok/len/errno (values that vary, e.g. TCP_INFO).
    mask_port: zero a sockaddr_in's port when it equals this (an ephemeral listener port)."""
    error, optlen, data = _getsockopt(sock.fileno(), level, optname, buflen)
    case: dict[str, Any] = {
        "ok": error == 0,
        "len": optlen,
        "hex": "",
        "errno": error or None,
    }
    if error == 0 and keep_value:
        if mask_port is not None and len(data) >= 4 and data[2:4] == struct.pack("!H", mask_port):
            data = data[:2] + b"\0\0" + data[4:]
            case["masked"] = "port==listener"
        if len(data) <= HEX_LIMIT:
            case["hex"] = data.hex()
        else:
            case["head"] = data[:32].hex()
            case["sha256"] = hashlib.sha256(data).hexdigest()
    return case


ORIGINAL_DST_BUFFERS = (8, 16, 8192)  # too small for a sockaddr_in, exact, past a page
SOL_IPV6 = 41
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOCKADDR_IN6_SIZE = 28
# Too small for a sockaddr_in6 (a sockaddr_in's size), exact, past a page.
ORIGINAL_DST6_BUFFERS = (16, SOCKADDR_IN6_SIZE, 8192)


def original_dst(sock: socket.socket, buflen: int) -> str:
    """SO_ORIGINAL_DST with a buffer of ``buflen``: "ip:port", or the errno's name."""
    error, optlen, data = _getsockopt(sock.fileno(), SOL_IP, SO_ORIGINAL_DST, buflen)
    if error:
        return errno.errorcode.get(error, str(error))
    if optlen < 8:
        return f"short answer ({optlen} bytes)"
    port, address = struct.unpack("!2xH4s", data[:8])
    return f"{socket.inet_ntoa(address)}:{port}"


def original_dst6(sock: socket.socket, buflen: int) -> str:
    """IP6T_SO_ORIGINAL_DST (SOL_IPV6) with a buffer of ``buflen``: "[ip]:port", or the errno's
    name. The optlen returned is left out, as original_dst leaves it out: netfilter leaves it
    as the caller gave it, which a cgroup getsockopt program cannot do past a page."""
    error, optlen, data = _getsockopt(sock.fileno(), SOL_IPV6, IP6T_SO_ORIGINAL_DST, buflen)
    if error:
        return errno.errorcode.get(error, str(error))
    if len(data) < SOCKADDR_IN6_SIZE:
        return f"short answer ({optlen} bytes)"
    (family,) = struct.unpack("=H", data[:2])  # sa_family in host order
    port, address = struct.unpack("!H4x16s", data[2:24])  # port, flowinfo, address
    answer = _addr((socket.inet_ntop(socket.AF_INET6, address), port))
    return answer if family == socket.AF_INET6 else f"{answer} family {family}"


def socket_view(sock: socket.socket) -> dict[str, str]:
    """What a connected socket tells its owner about its connection: the local and peer
    addresses (getsockname, getpeername) and the original destination at each buffer size:
    SO_ORIGINAL_DST (ORIGINAL_DST_BUFFERS) on an IPv4 socket, IP6T_SO_ORIGINAL_DST
    (ORIGINAL_DST6_BUFFERS) on an IPv6 one."""
    view = {"local": _addr(sock.getsockname()), "peer": _addr(sock.getpeername())}
    if sock.family == socket.AF_INET6:
        for buflen in ORIGINAL_DST6_BUFFERS:
            view[f"IP6T_SO_ORIGINAL_DST/{buflen}"] = original_dst6(sock, buflen)
        return view
    for buflen in ORIGINAL_DST_BUFFERS:
        view[f"SO_ORIGINAL_DST/{buflen}"] = original_dst(sock, buflen)
    return view


def run_socket_view_client(args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout
    with socket.create_connection((args.host, args.port), timeout=args.timeout) as sock:
        sock.sendall(b"view\n")
        echoed = b""
        while len(echoed) < 5:
            chunk = sock.recv(5 - len(echoed))
            if not chunk:
                raise ConnectionError(f"closed after {len(echoed)} bytes echoed")
            echoed += chunk
        _print_json({"event": "connected", "view": socket_view(sock)})
        while not os.path.exists(args.hold_file):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{args.hold_file} did not appear within {args.timeout} s")
            time.sleep(0.02)
    _print_json({"closed": True})
    return 0


@dataclass(frozen=True)
class ProbeFamily:
    """What the getsockopt probe asks at the IP level of one family: its loopback address, the
    two options every socket of the family answers, and the original destination with the
    buffer it needs exactly and one too small."""

    loopback: str
    family: socket.AddressFamily
    level: int
    tos: tuple[str, int]
    ttl: tuple[str, int]
    original_dst: tuple[str, int, int]  # name, level, optname
    exact: int
    too_small: int


PROBE_FAMILIES: dict[str, ProbeFamily] = {
    "ipv4": ProbeFamily(
        "127.0.0.1",
        socket.AF_INET,
        socket.IPPROTO_IP,
        ("IP_TOS", socket.IP_TOS),
        ("IP_TTL", socket.IP_TTL),
        ("SO_ORIGINAL_DST", SOL_IP, SO_ORIGINAL_DST),
        16,
        8,
    ),
    "ipv6": ProbeFamily(
        "::1",
        socket.AF_INET6,
        socket.IPPROTO_IPV6,
        ("IPV6_TCLASS", socket.IPV6_TCLASS),
        ("IPV6_UNICAST_HOPS", socket.IPV6_UNICAST_HOPS),
        ("IP6T_SO_ORIGINAL_DST", SOL_IPV6, IP6T_SO_ORIGINAL_DST),
        SOCKADDR_IN6_SIZE,
        16,
    ),
}


def _loopback_tcp_pair(
    probe: ProbeFamily = PROBE_FAMILIES["ipv4"],
) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(probe.family, socket.SOCK_STREAM)
    listener.settimeout(5.0)
    listener.bind((probe.loopback, 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname()[:2], timeout=5.0)
    accepted, _ = listener.accept()
    return listener, client, accepted


def _peergroups_socketpair() -> tuple[socket.socket, socket.socket, int | None]:
    """A socketpair whose peer credentials carry GROUPS_FOR_PEERGROUPS (the creds are captured at
    socketpair() time). Returns errno of setgroups() (None when it worked)."""
    saved = os.getgroups()
    setgroups_errno = None
    try:
        os.setgroups(list(GROUPS_FOR_PEERGROUPS))
    except OSError as exc:
        setgroups_errno = exc.errno
    try:
        first, second = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    finally:
        if setgroups_errno is None:
            os.setgroups(saved)
    return first, second, setgroups_errno


def getsockopt_battery(
    peergroups_pair: tuple[socket.socket, socket.socket, int | None], family: str = "ipv4"
) -> dict[str, dict[str, Any]]:
    """{case name: result}. Every name and value here is deterministic for one context.
    ``family`` "ipv6": the TCP and UDP sockets are IPv6 ones (on ::1), asked the IPv6 level's
    options and IP6T_SO_ORIGINAL_DST instead of the IPv4 ones; the other cases are the same."""
    probe = PROBE_FAMILIES[family]
    cases: dict[str, dict[str, Any]] = {}
    listener, client, accepted = _loopback_tcp_pair(probe)
    port = listener.getsockname()[1]
    ip, tcp, sol = probe.level, socket.IPPROTO_TCP, socket.SOL_SOCKET
    (tos, tos_opt), (ttl, ttl_opt) = probe.tos, probe.ttl
    odst, odst_level, odst_opt = probe.original_dst
    tcp_options: list[tuple[str, int, int, int, bool]] = [
        # name, level, optname, normal buffer, also with BIG_BUFFER
        ("SO_TYPE", sol, socket.SO_TYPE, 4, True),
        ("SO_RCVBUF", sol, socket.SO_RCVBUF, 4, True),
        ("SO_SNDBUF", sol, socket.SO_SNDBUF, 4, True),
        ("SO_ERROR", sol, socket.SO_ERROR, 4, True),
        ("SO_KEEPALIVE", sol, socket.SO_KEEPALIVE, 4, True),
        ("SO_REUSEADDR", sol, socket.SO_REUSEADDR, 4, True),
        ("SO_DOMAIN", sol, SO_DOMAIN, 4, True),
        ("SO_PROTOCOL", sol, SO_PROTOCOL, 4, True),
        ("TCP_NODELAY", tcp, socket.TCP_NODELAY, 4, True),
        ("TCP_MAXSEG", tcp, socket.TCP_MAXSEG, 4, True),
        ("TCP_CONGESTION", tcp, TCP_CONGESTION, 16, True),
        ("TCP_INFO", tcp, TCP_INFO, 256, True),
        (tos, ip, tos_opt, 4, True),
        (ttl, ip, ttl_opt, 4, True),
        (odst, odst_level, odst_opt, probe.exact, True),
    ]
    try:
        for name, level, optname, buflen, big in tcp_options:
            keep = name != "TCP_INFO"
            mask = port if name == odst else None
            cases[f"tcp/{name}"] = _probe_case(
                client, level, optname, buflen, keep_value=keep, mask_port=mask
            )
            if big:
                cases[f"tcp/{name}/buf{BIG_BUFFER}"] = _probe_case(
                    client, level, optname, BIG_BUFFER, keep_value=keep, mask_port=mask
                )
        # What Envoy does: SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST) on the accepted socket.
        cases[f"tcp-accepted/{odst}"] = _probe_case(
            accepted, odst_level, odst_opt, probe.exact, mask_port=port
        )
        cases[f"tcp-accepted/{odst}/buf8192"] = _probe_case(
            accepted, odst_level, odst_opt, BIG_BUFFER, mask_port=port
        )
        # Too small buffers: what the kernel does (truncates ints; SO_ORIGINAL_DST wants >= 16,
        # IP6T_SO_ORIGINAL_DST >= 28).
        cases["tcp/SO_RCVBUF/buf2"] = _probe_case(client, sol, socket.SO_RCVBUF, 2)
        cases["tcp/SO_RCVBUF/buf0"] = _probe_case(client, sol, socket.SO_RCVBUF, 0)
        cases["tcp/TCP_CONGESTION/buf4"] = _probe_case(client, tcp, TCP_CONGESTION, 4)
        cases[f"tcp/{odst}/buf{probe.too_small}"] = _probe_case(
            client, odst_level, odst_opt, probe.too_small, mask_port=port
        )
        cases["tcp-listener/SO_ACCEPTCONN"] = _probe_case(listener, sol, socket.SO_ACCEPTCONN, 4)
    finally:
        for sock in (accepted, client, listener):
            sock.close()
    with socket.socket(probe.family, socket.SOCK_DGRAM) as udp:
        cases["udp/SO_TYPE"] = _probe_case(udp, sol, socket.SO_TYPE, 4)
        cases["udp/SO_TYPE/buf8192"] = _probe_case(udp, sol, socket.SO_TYPE, BIG_BUFFER)
        cases[f"udp/{ttl}"] = _probe_case(udp, ip, ttl_opt, 4)
        cases[f"udp/{ttl}/buf8192"] = _probe_case(udp, ip, ttl_opt, BIG_BUFFER)
    first, second, setgroups_errno = peergroups_pair
    try:
        needed = 4 * len(GROUPS_FOR_PEERGROUPS)
        for buflen in (4 * PAGE_SIZE, PAGE_SIZE):  # enough (> PAGE_SIZE), and too small: ERANGE
            case = _probe_case(first, sol, SO_PEERGROUPS, buflen)
            if setgroups_errno is not None:
                case["setgroups_errno"] = setgroups_errno
            else:
                case["groups_expected_len"] = needed
            cases[f"unix/SO_PEERGROUPS/buf{buflen}"] = case
    finally:
        first.close()
        second.close()
    return cases


def run_getsockopt_probe(args: argparse.Namespace) -> int:
    pair = _peergroups_socketpair()  # as root, before dropping to --run-as
    _drop_privileges(args.run_as)
    print(json.dumps(getsockopt_battery(pair, args.family), sort_keys=True), flush=True)
    return 0


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
    server.add_argument(
        "--host6", default="::", help="also listen here, IPv6 only ('' for IPv4 alone)"
    )
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--read-api", choices=READ_APIS, default="recv")
    server.add_argument("--log", help="JSON-lines event log (default: stdout)")
    server.add_argument(
        "--io-timeout", type=float, default=30.0, help="per-connection idle timeout"
    )
    server.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    server.add_argument(
        "--read-pause", type=float, default=0.0, help="sleep after every read: a slow reader"
    )
    server.add_argument(
        "--lifetime", type=float, default=3600.0, help="exit after this many seconds (0 = never)"
    )
    server.set_defaults(handler=run_echo_server)

    clients = (
        ("echo-client", run_echo_client),
        ("rr-client", run_rr_client),
        ("request", run_request),
        ("socket-view-client", run_socket_view_client),
    )
    for name, handler in clients:
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
            client.add_argument("--source-port", type=int, default=0)
            client.add_argument("--chunk", type=int, default=BUFFER_SIZE)
            client.add_argument(
                "--no-half-close",
                action="store_true",
                help="close after reading N bytes instead of shutdown(SHUT_WR) + EOF",
            )
            client.add_argument(
                "--pace-seconds",
                type=float,
                default=0.0,
                help="spread the bytes over this many seconds (0: as fast as possible)",
            )
            client.add_argument("--pace-chunks", type=int, default=50)
            client.add_argument(
                "--reset-after",
                type=int,
                default=None,
                metavar="BYTES",
                help="after BYTES are echoed, SO_LINGER {1, 0} and close: send an RST",
            )
            client.add_argument(
                "--progress", action="store_true", help="print JSON event lines while running"
            )
        elif name == "rr-client":
            client.add_argument("--connections", type=int, default=1)
            client.add_argument("--duration", type=float, default=3.0)
            client.add_argument(
                "--plan",
                type=connection_plan,
                help="per worker, in order: C connections of R requests each, then stop",
            )
            client.add_argument("--size", type=int, default=1024)
            client.add_argument("--seed", type=int, default=1)
        elif name == "socket-view-client":
            client.add_argument("--hold-file", required=True)
        else:
            client.add_argument("--message", default="ping")

    probe = commands.add_parser("getsockopt-probe")
    probe.add_argument("--family", choices=tuple(PROBE_FAMILIES), default="ipv4")
    probe.add_argument(
        "--run-as", help="UID[:GID] to switch to after making the SO_PEERGROUPS socketpair"
    )
    probe.set_defaults(handler=run_getsockopt_probe, drops_privileges_itself=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "drops_privileges_itself", False):
        _drop_privileges(getattr(args, "run_as", None))
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
