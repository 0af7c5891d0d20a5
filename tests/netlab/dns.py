"""A DNS server stand-in and a resolver client for netlab pods. Standard library only.

Run by path (``python tests/netlab/dns.py ...``), like apps.py.

  server --address IP [--address IP ...] --port P --answer A.B.C.D
      Answer every query, over UDP and TCP, with one A record: ``--answer``, on every
      ``--address`` (IPv4 or IPv6). Prints {"event": "listening"} once every socket listens.
  query --server IP [--port 53] --transport udp|udp-connected|tcp [--name NAME] [--run-as UID:GID]
      One A query the way a resolver sends it: ``udp`` with sendto/recvfrom on an unconnected
      socket (musl's way), ``udp-connected`` with connect/send/recv (glibc's), ``tcp`` with a
      length-prefixed message, over IPv6 when ``--server`` is an IPv6 address. Prints one JSON
      line: {"answer": the A record, "source": where recvfrom said the reply came from (udp),
      "peer": getpeername() (connected sockets)}; an IPv6 "ip:port" in brackets.
      ``--run-as`` drops root after start-up, e.g. to query as the proxy's uid.

Every blocking call has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import threading
from ipaddress import IPv4Address

TIMEOUT = 5.0
QUERY_ID = 0x4D41
TYPE_A = CLASS_IN = 1


def build_query(name: str) -> bytes:
    header = struct.pack("!HHHHHH", QUERY_ID, 0x0100, 1, 0, 0, 0)  # RD, one question
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return header + labels + b"\x00" + struct.pack("!HH", TYPE_A, CLASS_IN)


def build_answer(query: bytes, address: IPv4Address) -> bytes:
    """The reply to ``query`` with one A record (the question copied, pointed to by name)."""
    (query_id,) = struct.unpack("!H", query[:2])
    question = query[12:]
    header = struct.pack("!HHHHHH", query_id, 0x8180, 1, 1, 0, 0)
    record = struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, 60, 4) + address.packed
    return header + question + record


def parse_answer(reply: bytes) -> str:
    query_id, flags, questions, answers = struct.unpack("!HHHH", reply[:8])
    if query_id != QUERY_ID or not flags & 0x8000 or questions != 1 or answers < 1:
        raise ValueError(f"not an answer to our query: {reply!r}")
    offset = 12
    while reply[offset]:
        offset += reply[offset] + 1
    offset += 5  # the root label, type and class
    _, rtype, _, _, length = struct.unpack("!HHHIH", reply[offset : offset + 12])
    if rtype != TYPE_A or length != 4:
        raise ValueError(f"not an A record: {reply!r}")
    return str(IPv4Address(reply[offset + 12 : offset + 16]))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed before a whole message")
        data += chunk
    return data


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _bound(address: str, port: int, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(_family(address), kind)
    if sock.family == socket.AF_INET6:  # each family has its own sockets
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if kind == socket.SOCK_STREAM:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return sock


def serve(addresses: list[str], port: int, answer: IPv4Address) -> None:
    def serve_udp(udp: socket.socket) -> None:
        while True:
            query, client = udp.recvfrom(512)
            udp.sendto(build_answer(query, answer), client)

    def serve_tcp_connection(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            (length,) = struct.unpack("!H", _recv_exact(conn, 2))
            reply = build_answer(_recv_exact(conn, length), answer)
            conn.sendall(struct.pack("!H", len(reply)) + reply)

    def serve_tcp(tcp: socket.socket) -> None:
        while True:
            conn, _ = tcp.accept()
            threading.Thread(target=serve_tcp_connection, args=(conn,), daemon=True).start()

    servers = []
    for address in addresses:
        tcp = _bound(address, port, socket.SOCK_STREAM)
        tcp.listen(16)
        servers += [(serve_udp, _bound(address, port, socket.SOCK_DGRAM)), (serve_tcp, tcp)]
    threads = [threading.Thread(target=run, args=(sock,), daemon=True) for run, sock in servers]
    for thread in threads:
        thread.start()
    print(json.dumps({"event": "listening"}), flush=True)
    for thread in threads:
        thread.join()


def _address(pair: tuple[str, int]) -> str:
    host = str(pair[0])
    return f"[{host}]:{pair[1]}" if ":" in host else f"{host}:{pair[1]}"


def query(server: str, port: int, transport: str, name: str) -> dict[str, str | None]:
    message = build_query(name)
    if transport == "tcp":
        with socket.create_connection((server, port), timeout=TIMEOUT) as stream:
            stream_peer = _address(stream.getpeername())
            stream.sendall(struct.pack("!H", len(message)) + message)
            (length,) = struct.unpack("!H", _recv_exact(stream, 2))
            answer = parse_answer(_recv_exact(stream, length))
            return {"answer": answer, "source": None, "peer": stream_peer}
    with socket.socket(_family(server), socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        peer: str | None = None
        if transport == "udp-connected":
            sock.connect((server, port))
            peer = _address(sock.getpeername())
            sock.send(message)
        else:
            sock.sendto(message, (server, port))
        reply, source = sock.recvfrom(512)
        return {"answer": parse_answer(reply), "source": _address(source), "peer": peer}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dns.py")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server")
    server.add_argument("--address", action="append", required=True)
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--answer", type=IPv4Address, required=True)
    client = commands.add_parser("query")
    client.add_argument("--server", required=True)
    client.add_argument("--port", type=int, default=53)
    client.add_argument("--transport", choices=("udp", "udp-connected", "tcp"), required=True)
    client.add_argument("--name", default="upstream.example")
    client.add_argument("--run-as", default=None, help="UID:GID")
    args = parser.parse_args(argv)
    if args.command == "server":
        serve(args.address, args.port, args.answer)
        return 0
    if args.run_as:
        "".encode("idna")  # socket calls encode hosts so: load the codec while files are readable
        uid, gid = (int(part) for part in args.run_as.split(":"))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    print(json.dumps(query(args.server, args.port, args.transport, args.name)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
