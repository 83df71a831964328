"""The memory-node process: pages in shared memory, a control channel for the rest.

    speckv memnode --size 8GiB [--socket PATH] [--link cxl2-x16]

At start it creates an anonymous shared-memory segment (memfd, mode 0600) of
`--size` bytes and pre-faults it (first-touch page faults make the first writes
~10x slower), then listens on a Unix socket (no access for other users; by default in this user's
private runtime directory). Clients (engines) attach with their slot size and
receive the segment's file descriptor, map it, and from then on read and write
pages directly in that memory (zero copy through the node); the socket carries only
control messages, in `wire`'s JSON frames, each answered by one reply:

    {"op": "attach", "version": 1, "slot_bytes": B} -> {"ok", "num_slots", "size", "link"} + fd
    {"op": "allocate", "n": N}                      -> {"ok", "ids": [slot ids] | null}
    {"op": "free", "ids": [slot ids]}               -> {"ok"}
    {"op": "stats"}                                 -> {"ok", "num_slots", "num_free", "clients"}
    {"op": "ping"}                                  -> {"ok"}
    anything invalid                                -> {"ok": false, "error": why}

Several engines of the same user may attach at once (same slot size while any is
attached); each owns the slots it allocated, which are freed when its connection
closes, and may free only those. A client of another user is refused
(SO_PEERCRED). A connection that does not attach within `HANDSHAKE_S` is closed,
so an idle or hostile client cannot hold the node. SIGINT/SIGTERM remove the socket
and exit 0; the segment has no name, so even a killed node leaves no file behind.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import signal
import socket
import stat
import sys
import threading
from pathlib import Path

import numpy as np

from speckv.pool import wire
from speckv.pool.slots import SlotAllocator

logger = logging.getLogger(__name__)

HANDSHAKE_S = 10.0  # seconds a new connection has to attach
MAX_CONNECTIONS = 64


def default_socket_path() -> str:
    """`memnode.sock` in this user's private runtime directory (created 0700)."""
    return os.path.join(wire.private_runtime_dir(), "memnode.sock")


class MemNode:
    """The node's state: the segment, its slots and which client owns each."""

    def __init__(self, size: int, link: str) -> None:
        self.size = size
        self.link = link
        self.fd = self._create_segment()
        self._lock = threading.Lock()
        self._slot_bytes: int | None = None  # fixed while any client is attached
        self._slots: SlotAllocator | None = None
        self._owner: np.ndarray = np.zeros(0, dtype=np.int64)  # client id per slot, -1 free
        self._clients: set[int] = set()
        self._connections = 0

    def _create_segment(self) -> int:
        fd = os.memfd_create("speckv-memnode", os.MFD_CLOEXEC)
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, self.size)
        with mmap.mmap(fd, self.size) as mapped:
            np.frombuffer(mapped, dtype=np.uint8)[::mmap.PAGESIZE] = 0  # pre-fault every page
        return fd

    # ------------------------------------------------------------ connections

    def handle(self, conn: socket.socket, client: int) -> None:
        """Serves one connection until it closes or breaks the protocol."""
        try:
            wire.check_peer(conn, "the client")
            conn.settimeout(HANDSHAKE_S)
            while True:
                try:
                    message, _ = wire.recv(conn)
                except wire.BadMessage as exc:
                    wire.send(conn, _error(str(exc)))
                    continue
                reply = self._reply(client, message)
                fds = [self.fd] if message.get("op") == "attach" and reply["ok"] else None
                wire.send(conn, reply, fds)
                if client in self._clients:
                    conn.settimeout(None)  # attached: it may stay idle as long as it likes
        except wire.WireError as exc:
            logger.info("client %d: %s", client, exc)
            try:
                wire.send(conn, _error(str(exc)))
            except wire.WireError:
                pass
        finally:
            self._detach(client)
            conn.close()

    def admit(self) -> bool:
        with self._lock:
            if self._connections >= MAX_CONNECTIONS:
                return False
            self._connections += 1
            return True

    def _detach(self, client: int) -> None:
        with self._lock:
            self._connections -= 1
            if client not in self._clients:
                return
            self._clients.discard(client)
            mine = np.flatnonzero(self._owner == client)
            self._owner[mine] = -1
            self._slots.free(mine)
            if not self._clients:  # the next client may bring another slot size
                self._slot_bytes, self._slots = None, None

    # ------------------------------------------------------------ requests

    def _reply(self, client: int, message: dict) -> dict:
        op = message.get("op")
        try:
            with self._lock:
                if op == "ping":
                    return {"ok": True}
                if op == "attach":
                    return self._attach(client, message)
                if client not in self._clients:
                    return _error("attach first")
                if op == "allocate":
                    return self._allocate(client, wire.field(
                        message, "n", int, low=1, high=self._slots.num_slots))
                if op == "free":
                    return self._free(client, wire.id_list(message, "ids", self._slots.num_slots))
                if op == "stats":
                    return {"ok": True, "num_slots": self._slots.num_slots,
                            "num_free": self._slots.num_free, "clients": len(self._clients)}
            return _error(f"unknown operation {op!r}; known: attach, allocate, free, stats, ping")
        except wire.BadMessage as exc:
            return _error(f"{op}: {exc}")

    def _attach(self, client: int, message: dict) -> dict:
        version = wire.field(message, "version", int)
        if version != wire.PROTOCOL_VERSION:
            return _error(f"protocol version {version} is not this node's "
                          f"{wire.PROTOCOL_VERSION}: run engine and node from one speckv")
        slot_bytes = wire.field(message, "slot_bytes", int, low=1, high=self.size)
        if client in self._clients:
            return _error("already attached")
        if self._slot_bytes is not None and slot_bytes != self._slot_bytes:
            return _error(f"the node serves {self._slot_bytes}-byte slots to the engines attached "
                          f"now; this engine asks for {slot_bytes}: use a node of its own")
        if self._slots is None:
            self._slot_bytes = slot_bytes
            self._slots = SlotAllocator(self.size // slot_bytes)
            self._owner = np.full(self._slots.num_slots, -1, dtype=np.int64)
        self._clients.add(client)
        return {"ok": True, "num_slots": self._slots.num_slots, "size": self.size,
                "slot_bytes": slot_bytes, "link": self.link}

    def _allocate(self, client: int, n: int) -> dict:
        ids = self._slots.allocate(n)
        if ids is None:
            return {"ok": True, "ids": None}
        self._owner[ids] = client
        return {"ok": True, "ids": ids.tolist()}

    def _free(self, client: int, ids: list[int]) -> dict:
        index = np.asarray(ids, dtype=np.int64)
        if not (self._owner[index] == client).all():
            return _error("free: a slot is not held by this client")
        self._owner[index] = -1
        self._slots.free(index)
        return {"ok": True}


def _error(why: str) -> dict:
    return {"ok": False, "error": why}


# ---------------------------------------------------------------- the process


def _listen(socket_path: str) -> socket.socket:
    """A listening socket at `socket_path`, mode 0600 from the start; a stale socket
    of this user there is replaced, anything else is refused."""
    if os.path.lexists(socket_path):
        st = wire.check_owned(socket_path, "an existing file at the socket path")
        if not stat.S_ISSOCK(st.st_mode):
            raise ValueError(f"{socket_path} exists and is not a socket: choose another --socket")
        os.unlink(socket_path)  # a node killed earlier leaves its socket behind
    parent = os.path.dirname(os.path.abspath(socket_path))
    if os.stat(parent).st_mode & 0o022:
        logger.warning("the socket's directory %s is writable by other users; the default "
                       "(leave --socket out) is a private one", parent)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(socket_path)
    finally:
        os.umask(old)
    listener.listen(MAX_CONNECTIONS)
    return listener


def serve(size: int, socket_path: str, link: str) -> None:
    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)  # from here on, a signal unwinds through `finally`
    signal.signal(signal.SIGINT, stop)
    listener = None
    try:
        node = MemNode(size, link)
        listener = _listen(socket_path)
        print(f"memnode ready: {size} bytes, socket {socket_path}, link {link}", flush=True)
        client = 0
        while True:
            conn, _ = listener.accept()
            client += 1
            if not node.admit():
                wire.send(conn, _error(f"the node serves {MAX_CONNECTIONS} connections already"))
                conn.close()
                continue
            threading.Thread(target=node.handle, args=(conn, client), daemon=True).start()
    finally:
        if listener is not None:
            listener.close()
            Path(socket_path).unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="8GiB",
                        help="bytes of shared memory to hold pages, e.g. 8GiB (default: 8GiB)")
    parser.add_argument("--socket", default=None,
                        help="path of the Unix control socket (default: memnode.sock in "
                             "$XDG_RUNTIME_DIR/speckv, else /tmp/speckv-UID, a directory only "
                             "you can enter)")
    parser.add_argument("--link", default="none",
                        help="link model engines apply to transfers: none, cxl2-x16, "
                             "cxl3-x16, pcie4-x16, pcie5-x16 or custom:<GB/s>,<ns> "
                             "(default: none)")


def run(ns: argparse.Namespace) -> int:
    from speckv.pool.link import parse_link
    from speckv.util import parse_size

    size = parse_size(ns.size)
    if size <= 0:
        raise ValueError(f"--size must be > 0, got {ns.size!r}")
    parse_link(ns.link)  # validates
    free = os.statvfs("/dev/shm")
    if size > free.f_bavail * free.f_frsize:
        raise ValueError(f"--size {ns.size} exceeds the free shared memory (/dev/shm: "
                         f"{free.f_bavail * free.f_frsize} bytes)")
    try:
        serve(size, ns.socket or default_socket_path(), ns.link)
    except wire.WireError as exc:
        raise ValueError(str(exc)) from exc
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speckv-memnode", description=__doc__.split("\n")[0])
    add_arguments(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(ns)
    except (ValueError, OSError) as exc:
        print(f"speckv memnode: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
