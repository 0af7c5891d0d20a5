"""Requests at a fixed pace, one new TCP connection each, every echo checked byte for byte.

Run as a module from the repository root, inside a netlab pod (its netns and cgroup), so that
its connects are the ones meshaccel steers:

    python -m tests.agent_lifecycle.request_loop --host 198.18.0.11 --port 8080 --count 400

Request i starts at start + i * interval (or at once, when the previous one ran late; never two
at a time). Each: connect, send --size deterministic bytes, shutdown(SHUT_WR), read to EOF,
compare. One JSON line per request on stdout::

    {"i": 7, "t": 1732662000.123, "ok": true, "local": "198.18.0.10:40312",
     "kernel_local": "127.0.0.1:40312", "ms": 1.9}

("t" is the wall-clock start, "local" the client's own address as getsockname() answers it,
the pod's address on either path, "kernel_local" the socket's real one from /proc/net/tcp:
127.0.0.1 when connect4 steered it to the sidecar), then a summary line
{"done": true, "count": N, "ok": K}. Exit 0 only if every request was exact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import time
from typing import Any

from tests.netlab.apps import kernel_tuple


def payload(index: int, size: int) -> bytes:
    """Deterministic bytes for request ``index``, different for every request."""
    out = b""
    block = 0
    while len(out) < size:
        out += hashlib.sha256(f"{index}:{block}".encode()).digest()
        block += 1
    return out[:size]


def one_request(host: str, port: int, index: int, size: int, timeout: float) -> dict[str, Any]:
    record: dict[str, Any] = {"i": index, "t": round(time.time(), 4), "ok": False}
    started = time.monotonic()
    expected = payload(index, size)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            local_ip, local_port = sock.getsockname()[:2]
            record["local"] = f"{local_ip}:{local_port}"
            record["kernel_local"], _ = kernel_tuple(sock)
            sock.sendall(expected)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while len(received) <= size:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        record["ok"] = received == expected
        if not record["ok"]:
            record["error"] = f"echo mismatch: {len(received)} bytes back, {size} sent"
    except OSError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["ms"] = round((time.monotonic() - started) * 1000, 2)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    if not 1 <= args.count <= 100_000 or not 0 < args.size <= 1 << 20:
        raise SystemExit("--count must be 1..100000 and --size 1..1048576")
    start = time.monotonic()
    ok = 0
    for index in range(args.count):
        delay = start + index * args.interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        record = one_request(args.host, args.port, index, args.size, args.timeout)
        ok += record["ok"]
        print(json.dumps(record), flush=True)
    print(json.dumps({"done": True, "count": args.count, "ok": ok}), flush=True)
    return 0 if ok == args.count else 1


if __name__ == "__main__":
    sys.exit(main())
