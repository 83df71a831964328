"""`memnode`: pages in a separate memory-node process (see `memnode_server`).

The engine connects to a node's Unix socket (`memnode_socket`), or spawns its own
node when none is given and stops it on close. Control messages (attach,
allocate, free) go over the socket; page data is copied directly to and from
the node's shared-memory segment, mapped here too, with the link model applied
to every batched copy.

Failure policy: if the node dies or stops answering, every call raises
`PoolUnavailable` at once (nothing waits more than `TIMEOUT_S`). The engine then
fails the requests that hold pages (their sealed pages were in the node) and
keeps running without the pool: new requests are accepted again once the node
is back (an engine-spawned node is restarted on the next request; an external
one must be restarted by whoever started it).
"""

from __future__ import annotations

import logging
import mmap
import os
import subprocess
import sys
import tempfile
import threading
import weakref
from multiprocessing.connection import Client

import numpy as np
import torch

from speckv.pool.base import ArenaPool, PoolKey, PoolUnavailable, register_pool
from speckv.pool.link import parse_link
from speckv.pool.memnode_server import AUTHKEY

logger = logging.getLogger(__name__)

TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0


def spawn_memnode(size: int, socket_path: str, link: str) -> subprocess.Popen:
    """Starts `speckv memnode` as a child process and waits until it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "speckv.pool.memnode_server", "--size", str(size),
         "--socket", socket_path, "--link", link],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # blocks until "ready" or the process exits
    if not line.startswith("memnode ready"):
        proc.kill()
        err = proc.stderr.read().strip()
        raise PoolUnavailable(f"the memory node did not start: {err or line or 'no output'}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@register_pool("memnode")
class MemNodePool(ArenaPool):
    """Slots in a memory node's shared memory; allocation over its control socket."""

    def __init__(self, slot_bytes: int, capacity_bytes: int, *, device: torch.device,
                 socket: str | None = None, link: str | None = None, **_: object) -> None:
        super().__init__(slot_bytes)
        self.socket_path = socket
        self._link_override = link
        self._proc: subprocess.Popen | None = None
        self._capacity = capacity_bytes
        self._conn = None
        self._socket_lock = threading.Lock()
        self._num_free = 0
        self._held: set[int] = set()
        if socket is None:
            self.socket_path = os.path.join(tempfile.gettempdir(),
                                            f"speckv-memnode-{os.getpid()}-{id(self):x}.sock")
            self._spawn()
        self._connect()

    # ------------------------------------------------------------ connection

    def _spawn(self) -> None:
        self._proc = spawn_memnode(self._capacity, self.socket_path, self._link_override or "none")
        self._finalizer = weakref.finalize(self, _stop, self._proc)

    def _connect(self) -> None:
        try:
            self._conn = Client(self.socket_path, family="AF_UNIX", authkey=AUTHKEY)
        except (OSError, EOFError) as exc:
            raise PoolUnavailable(
                f"cannot reach the memory node at {self.socket_path} ({exc}); start it with "
                f"`speckv memnode --socket {self.socket_path} --size 8GiB`") from exc
        reply = self._call("attach", self.slot_bytes)
        if isinstance(reply, dict) and "error" in reply:
            raise PoolUnavailable(f"memory node at {self.socket_path}: {reply['error']}")
        self.link = parse_link(self._link_override or reply["link"])
        with open(reply["shm"], "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), reply["size"])
        num = reply["num_slots"]
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=num * self.slot_bytes)
        self._attach_arena(flat.view(num, self.slot_bytes))
        self._num_free = num
        self._held = set()
        self.counters.encoded_bytes = 0
        logger.info("attached to memory node %s: %d slots of %d bytes, link %s",
                    self.socket_path, num, self.slot_bytes, self.link)

    def _call(self, *message):
        with self._socket_lock:  # one request at a time: a reply is never taken for a hangup
            return self._call_locked(*message)

    def _call_locked(self, *message):
        if self._conn is None:
            raise PoolUnavailable(f"the memory node at {self.socket_path} is unavailable")
        try:
            self._conn.send(message)
            if not self._conn.poll(TIMEOUT_S):
                raise PoolUnavailable(f"the memory node at {self.socket_path} did not answer "
                                      f"within {TIMEOUT_S:.0f} s")
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            self._lost()
            raise PoolUnavailable(f"lost the memory node at {self.socket_path}: {exc}") from exc
        except PoolUnavailable:
            self._lost()
            raise

    def _lost(self) -> None:
        """Forgets the node: its memory and every page in it are gone."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self.arena = None
        self._held = set()
        self._num_free = 0
        self.counters.encoded_bytes = 0

    @property
    def is_available(self) -> bool:
        return self._conn is not None

    def ensure_available(self) -> None:
        """Raises PoolUnavailable if the node is gone. Thread-safe: the prefetch worker's
        loads check too, so the socket is polled only between requests."""
        with self._socket_lock:
            if self._conn is not None and (self._conn.poll(0) or
                                           (self._proc is not None and self._proc.poll() is not None)):
                self._lost()  # the node never speaks unasked: a readable socket means it closed
        if self._conn is None:
            raise PoolUnavailable(f"the memory node at {self.socket_path} is gone")

    def revive(self) -> None:
        """Reconnects to a restarted node (restarting it when this engine spawned it)."""
        if self._conn is not None:
            return
        if self._proc is not None:
            self._finalizer()
            logger.warning("restarting the memory node at %s", self.socket_path)
            self._spawn()
        self._connect()

    def close(self) -> None:
        self._lost()
        if self._proc is not None:
            self._finalizer()

    # ------------------------------------------------------------ slots

    @property
    def num_free(self) -> int:
        return self._num_free

    def allocate(self, n: int) -> list[PoolKey] | None:
        if n > self._num_free:
            return None
        self.ensure_available()
        keys = self._call("allocate", n)
        if keys is None:
            return None
        self._num_free -= n
        self._held.update(keys)
        return keys

    def free(self, keys: list[PoolKey]) -> None:
        if not keys or self._conn is None:
            return  # a lost node took its pages with it
        self._forget(keys)
        self._held.difference_update(keys)
        self._call("free", list(keys))
        self._num_free += len(keys)

    def contains(self, key: PoolKey) -> bool:
        return self._conn is not None and key in self._held and super().contains(key)

    def node_stats(self) -> dict:
        return self._call("stats")
