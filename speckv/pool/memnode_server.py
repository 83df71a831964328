"""The memory-node process: pages in shared memory, a control channel for the rest.

    speckv memnode --size 8GiB --socket /tmp/speckv-memnode.sock [--link cxl2-x16]

At start it creates a shared-memory file of `--size` bytes under /dev/shm and
pre-faults it (first-touch page faults make the first writes ~10x slower), then
listens on a Unix socket. A client (one engine at a time) attaches with its slot
size, maps the same file, and from then on reads and writes pages directly in
that memory (zero copy through the node); the socket carries only control
messages, each a tuple answered by one reply:

    ("attach", slot_bytes) -> {"shm": path, "num_slots": n, "link": spec}
    ("allocate", n)        -> [slot ids] | None (not enough free slots)
    ("free", [slot ids])   -> None
    ("stats",)             -> {"num_slots", "num_free", ...}
    ("ping",)              -> "pong"

Slots held by a client are freed when its connection closes. SIGINT/SIGTERM
remove the socket and the shared-memory file, then exit 0.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import mmap
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import numpy as np

from speckv.pool.slots import SlotAllocator

logger = logging.getLogger(__name__)

AUTHKEY = b"speckv-memnode"
SHM_DIR = Path("/dev/shm")


def shm_path_for(socket_path: str) -> Path:
    """The shared-memory file of the node listening on `socket_path`."""
    digest = hashlib.sha1(os.path.abspath(socket_path).encode()).hexdigest()[:16]
    return SHM_DIR / f"speckv-memnode-{digest}"


class MemNode:
    """The node's state: the mapped segment and the slots of the attached client."""

    def __init__(self, size: int, socket_path: str, link: str) -> None:
        self.size = size
        self.socket_path = socket_path
        self.link = link
        self.shm = shm_path_for(socket_path)
        self._lock = threading.Lock()
        self._client: Connection | None = None
        self._slots: SlotAllocator | None = None
        self._map = self._create_segment()

    def _create_segment(self) -> mmap.mmap:
        self.shm.unlink(missing_ok=True)  # a node killed earlier leaves its file behind
        fd = os.open(self.shm, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, self.size)
            mapped = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        page = mmap.PAGESIZE
        np.frombuffer(mapped, dtype=np.uint8)[::page] = 0  # pre-fault: touch every page
        return mapped

    def handle(self, conn: Connection) -> None:
        """Serves one client connection until it closes."""
        try:
            while True:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    return
                conn.send(self._reply(conn, message))
        finally:
            with self._lock:
                if self._client is conn:
                    self._client, self._slots = None, None
            conn.close()

    def _reply(self, conn: Connection, message: tuple):
        op, *args = message
        with self._lock:
            if op == "ping":
                return "pong"
            if op == "attach":
                if self._client is not None:
                    return {"error": "the memory node already serves another engine"}
                slot_bytes = int(args[0])
                self._client, self._slots = conn, SlotAllocator(self.size // slot_bytes)
                return {"shm": str(self.shm), "num_slots": self._slots.num_slots,
                        "size": self.size, "link": self.link}
            if self._client is not conn:
                return {"error": "attach first"}
            if op == "allocate":
                ids = self._slots.allocate(int(args[0]))
                return None if ids is None else ids.tolist()
            if op == "free":
                self._slots.free(np.asarray(args[0], dtype=np.int64))
                return None
            if op == "stats":
                return {"num_slots": self._slots.num_slots, "num_free": self._slots.num_free}
        return {"error": f"unknown operation {op!r}"}



def serve(size: int, socket_path: str, link: str) -> None:
    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)  # from here on, a signal unwinds through `finally`
    signal.signal(signal.SIGINT, stop)
    listener = None
    try:
        node = MemNode(size, socket_path, link)
        Path(socket_path).unlink(missing_ok=True)
        listener = Listener(socket_path, family="AF_UNIX", authkey=AUTHKEY)
        print(f"memnode ready: {size} bytes at {node.shm}, socket {socket_path}, link {link}",
              flush=True)
        while True:
            try:
                conn = listener.accept()
            except Exception as exc:  # a client that fails the handshake: keep serving
                logger.warning("rejected a connection: %s", exc)
                continue
            threading.Thread(target=node.handle, args=(conn,), daemon=True).start()
    finally:
        if listener is not None:
            listener.close()
        Path(socket_path).unlink(missing_ok=True)
        shm_path_for(socket_path).unlink(missing_ok=True)  # also if stopped while creating it


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="8GiB",
                        help="bytes of shared memory to hold pages, e.g. 8GiB (default: 8GiB)")
    parser.add_argument("--socket", required=True, help="path of the Unix control socket")
    parser.add_argument("--link", default="none",
                        help="link model engines apply to transfers: none, cxl2-x16, "
                             "cxl3-x16, pcie4-x16, pcie5-x16 or custom:<GB/s>,<ns> "
                             "(default: none)")


def run(ns: argparse.Namespace) -> int:
    from speckv.config import parse_size
    from speckv.pool.link import parse_link

    size = parse_size(ns.size)
    if size <= 0:
        raise ValueError(f"--size must be > 0, got {ns.size!r}")
    parse_link(ns.link)  # validates
    free = os.statvfs(SHM_DIR)
    if size > free.f_bavail * free.f_frsize:
        raise ValueError(f"--size {ns.size} exceeds the free space of {SHM_DIR} "
                         f"({free.f_bavail * free.f_frsize} bytes)")
    serve(size, ns.socket, ns.link)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speckv-memnode", description=__doc__.split("\n")[0])
    add_arguments(parser)
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(ns)
    except ValueError as exc:
        print(f"speckv memnode: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
