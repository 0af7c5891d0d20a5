"""Questions the agent asks the running kernel with real sockets, never by version number."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from meshaccel.agent import libbpf
from meshaccel.agent.pods import u32, u64

log = logging.getLogger(__name__)

SPLICE_PROBE_OBJECT = "splice_probe.bpf.o"


@contextlib.contextmanager
def _loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
    with sender, receiver:
        yield sender, receiver


@dataclass(frozen=True)
class SpliceProbe:
    """What the kernel did with one byte sk_msg redirected into a socket."""

    redirected: bool  # the byte reached the receiver's sk_msg queue (recv read it)
    spliced: bool  # splice() read it: applications may be redirect targets


def splice_reads_redirected_bytes(objects_dir: Path) -> bool:
    """Whether ``splice()`` on this kernel sees bytes sk_msg redirected into a socket."""
    return probe_splice(objects_dir).spliced


def probe_splice(objects_dir: Path) -> SpliceProbe:
    """Ask the kernel whether ``splice()`` sees bytes sk_msg redirected into a socket.

    On kernels where ``tcp_bpf`` has no ``splice_read`` (6.18 and before), such bytes wait in
    the socket's psock queue, which splice() and ``TCP_ZEROCOPY_RECEIVE`` never read: an
    application reading that way would stall, so applications are no redirect targets unless
    their pod opts in. A loopback pair in the agent's own network namespace is put in the
    probe's sockhash, one byte is sent, and the receiver splices. Any failure answers False.
    """
    try:
        with libbpf.BpfObject.open(objects_dir / SPLICE_PROBE_OBJECT) as probe:
            probe.load()
            sockets = probe.map("probe_sockets").handle()
            program = probe.program("redirect_to_receiver")
            libbpf.prog_attach(program.fd, sockets.fd, libbpf.AttachType.SK_MSG_VERDICT)
            with _loopback_pair() as (sender, receiver):
                sockets.update(u32(0), u64(sender.fileno()))
                sockets.update(u32(1), u64(receiver.fileno()))
                sender.send(b"x")
                return _splice_one_byte(receiver)
    except (libbpf.BpfError, OSError) as err:
        log.warning("splice probe failed (%s): applications are no redirect targets", err)
        return SpliceProbe(redirected=False, spliced=False)


def _splice_one_byte(receiver: socket.socket) -> SpliceProbe:
    receiver.setblocking(False)
    pipe_read, pipe_write = os.pipe()
    try:
        try:
            spliced = os.splice(receiver.fileno(), pipe_write, 1, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            spliced = 0
        if spliced:
            return SpliceProbe(redirected=True, spliced=True)
        # Not spliced: was it redirected at all? Then it is in the queue recv() reads.
        try:
            redirected = receiver.recv(1) == b"x"
        except OSError as err:
            if err.errno != errno.EAGAIN:
                raise
            redirected = False
        if not redirected:
            log.warning("splice probe: the byte was not redirected; assuming splice cannot")
        return SpliceProbe(redirected=redirected, spliced=False)
    finally:
        os.close(pipe_read)
        os.close(pipe_write)
