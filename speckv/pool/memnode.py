"""`memnode`: pages in a separate memory-node process (see `memnode_server`).

The engine connects to a node's Unix socket (`memnode_socket`), or spawns its own
node when none is given (its socket in a fresh 0700 directory) and stops it on
close. Control messages (attach, allocate, free) go over the socket in `wire`'s
JSON frames; page data is read and written directly in the node's segment, whose
file descriptor the node hands over at attach, with the link model applied to every
batched copy. The engine refuses a socket, a peer or a segment of another user.

Failure policy: every call to the node has a deadline (`timeout`, default 5 s). If
the node dies or stops answering, the call raises `PoolUnavailable`; the engine
then fails the requests that hold pages (their sealed pages were in the node) and
keeps running without the pool. A later request reconnects (an engine-spawned
node is restarted); after an attempt that waited out its deadline (a node that is
stopped, not dead), the next one comes `RETRY_S` later: in between, requests fail
at once instead of each waiting out a deadline.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import torch

from speckv.pool import wire
from speckv.pool.base import ArenaPool, PoolKey, PoolUnavailable
from speckv.pool.link import parse_link
from speckv.util import stop_child

logger = logging.getLogger(__name__)

TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0
RETRY_S = 2.0  # least time between two reconnection attempts


def spawn_memnode(size: int, socket_path: str, link: str,
                  timeout: float = START_TIMEOUT_S) -> subprocess.Popen:
    """Starts `speckv memnode` as a child process and waits (at most `timeout`) until
    it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "speckv.pool.memnode_server", "--size", str(size),
         "--socket", socket_path, "--link", link],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("memnode ready"):
        proc.kill()
        proc.wait()
        err = proc.stderr.read().strip()
        why = err or line.strip() or (f"no answer in {timeout:.0f} s" if not ready else "no output")
        raise PoolUnavailable(f"the memory node did not start: {why}")
    proc.stdout.close()  # nothing more is read: a full pipe must never block the node
    return proc


class MemNodePool(ArenaPool):
    """Slots in a memory node's shared memory; allocation over its control socket."""

    def __init__(self, slot_bytes: int, capacity_bytes: int, *, device: torch.device,
                 socket: str | None = None, link: str | None = None,
                 timeout: float = TIMEOUT_S, **_: object) -> None:
        super().__init__(slot_bytes)
        self.socket_path = socket
        self.timeout = timeout
        self._link_override = link
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._capacity = capacity_bytes
        self._sock: socket.socket | None = None
        self._map: mmap.mmap | None = None
        self._socket_lock = threading.Lock()
        self._num_free = 0
        self._held: set[int] = set()
        self._retry_at = 0.0
        self.last_error: str | None = None
        if self.socket_path is None:
            self._dir = tempfile.mkdtemp(prefix="speckv-memnode-")  # 0700
            self.socket_path = os.path.join(self._dir, "memnode.sock")
            self._spawn()
        self._connect()

    # ------------------------------------------------------------ connection

    def _spawn(self) -> None:
        self._proc = spawn_memnode(self._capacity, self.socket_path, self._link_override or "none")
        self._finalizer = weakref.finalize(self, stop_child, self._proc, self._dir)

    def _connect(self) -> None:
        try:
            self._sock = self._open_socket()
            reply, fds = self._request({"op": "attach", "version": wire.PROTOCOL_VERSION,
                                        "slot_bytes": self.slot_bytes}, max_fds=1)
            self._attach(reply, fds)
        except (wire.WireError, wire.BadMessage, wire.Refused, OSError) as exc:
            self._lost()
            self.last_error = str(exc)
            raise PoolUnavailable(
                f"cannot reach the memory node at {self.socket_path} ({exc}); start it with "
                f"`speckv memnode --socket {self.socket_path} --size 8GiB`") from exc
        self.last_error = None
        logger.info("attached to memory node %s: %d slots of %d bytes, link %s",
                    self.socket_path, self.num_slots, self.slot_bytes, self.link)

    def _open_socket(self) -> socket.socket:
        st = wire.check_owned(self.socket_path, "the memory node's socket")
        if not stat.S_ISSOCK(st.st_mode):
            raise wire.WireError(f"{self.socket_path} is not a socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
            wire.check_peer(sock, "the memory node")
        except BaseException:
            sock.close()
            raise
        return sock

    def _attach(self, reply: dict, fds: list[int]) -> None:
        """Maps the segment the node sent, after checking that it is what it claims."""
        try:
            if len(fds) != 1:
                raise wire.WireError("the node sent no shared-memory segment")
            num = wire.field(reply, "num_slots", int, low=1)
            size = wire.field(reply, "size", int, low=num * self.slot_bytes)
            link = wire.field(reply, "link", str)
            st = wire.check_private_fd(fds[0], "the memory node's segment")
            if st.st_size < size:
                raise wire.WireError(f"the segment has {st.st_size} bytes, not the {size} claimed")
            self.link = parse_link(self._link_override or link)
            self._map = mmap.mmap(fds[0], size)
        except ValueError as exc:  # parse_link, BadMessage
            raise wire.WireError(f"bad attach reply: {exc}") from exc
        finally:
            for fd in fds:
                os.close(fd)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=num * self.slot_bytes)
        self._attach_arena(flat.view(num, self.slot_bytes))
        self._num_free = num
        self._held = set()
        self.counters.encoded_bytes = 0

    def _call(self, message: dict) -> dict:
        """One request under the socket lock (a reply is never taken for another's)."""
        with self._socket_lock:
            if self._sock is None:
                raise PoolUnavailable(f"the memory node at {self.socket_path} is unavailable")
            try:
                reply, _ = self._request(message)
            except (wire.WireError, wire.BadMessage) as exc:
                self._lost()
                self.last_error = str(exc)
                raise PoolUnavailable(f"lost the memory node at {self.socket_path}: {exc}") from exc
            except wire.Refused as exc:  # the node is fine; what this side asked was wrong
                raise RuntimeError(f"bug: {exc}") from exc
            return reply

    def _request(self, message: dict, max_fds: int = 0) -> tuple[dict, list[int]]:
        wire.send(self._sock, message)
        reply, fds = wire.recv(self._sock, max_fds)
        if reply.get("ok") is not True:
            for fd in fds:
                os.close(fd)
            raise wire.Refused(f"the node refused {message['op']}: {reply.get('error')!r}")
        return reply, fds

    def _lost(self) -> None:
        """Forgets the node: its memory and every page in it are gone."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None
        self.arena = None  # the mapping is dropped with the last view of it
        self._map = None
        self._held = set()
        self._num_free = 0
        self.counters.encoded_bytes = 0

    @property
    def is_available(self) -> bool:
        return self._sock is not None

    def ensure_available(self) -> None:
        """Raises PoolUnavailable if the node is gone. Thread-safe: the prefetch worker's
        loads check too, so the socket is polled only between requests."""
        with self._socket_lock:
            if self._sock is not None and (select.select([self._sock], [], [], 0)[0] or
                                           (self._proc is not None and self._proc.poll() is not None)):
                self._lost()  # the node never speaks unasked: a readable socket means it closed
                self.last_error = "the node closed the connection"
        if self._sock is None:
            raise PoolUnavailable(f"the memory node at {self.socket_path} is gone")

    def ping(self) -> None:
        """Asks the node for a sign of life, within the deadline (PoolUnavailable if none)."""
        self.ensure_available()
        self._call({"op": "ping"})

    def revive(self) -> None:
        """Reconnects to a restarted node (restarting it when this engine spawned it);
        within `RETRY_S` of a failed attempt, fails at once."""
        if self._sock is not None:
            return
        now = time.monotonic()
        if now < self._retry_at:
            raise PoolUnavailable(f"the memory node at {self.socket_path} is unavailable "
                                  f"({self.last_error}); next retry in {self._retry_at - now:.1f} s")
        try:
            if self._proc is not None:
                self._finalizer()
                logger.warning("restarting the memory node at %s", self.socket_path)
                if self._dir is not None:
                    os.makedirs(self._dir, mode=0o700, exist_ok=True)
                self._spawn()
            self._connect()
        except PoolUnavailable:
            if time.monotonic() - now > 0.5:  # it waited out a deadline: do not wait again soon
                self._retry_at = time.monotonic() + RETRY_S
            raise

    def close(self) -> None:
        self._lost()
        if self._proc is not None:
            self._finalizer()

    # ------------------------------------------------------------ slots

    @property
    def num_free(self) -> int:
        return self._num_free

    def allocate(self, n: int) -> list[PoolKey] | None:
        if n == 0:
            return []
        if n > self._num_free:
            return None
        self.ensure_available()
        reply = self._call({"op": "allocate", "n": n})
        if reply.get("ids") is None:
            return None
        try:
            keys = wire.id_list(reply, "ids", self.num_slots)
            if len(keys) != n or self._held.intersection(keys):
                raise wire.BadMessage(f"{len(keys)} ids for {n}, or ids held already")
        except wire.BadMessage as exc:
            self._lost()
            raise PoolUnavailable(f"the memory node at {self.socket_path} answered allocate "
                                  f"with a bad reply: {exc}") from exc
        self._num_free -= n
        self._held.update(keys)
        return keys

    def free(self, keys: list[PoolKey]) -> None:
        if not keys or self._sock is None:
            return  # a lost node took its pages with it
        self._forget(keys)
        self._held.difference_update(keys)
        self._call({"op": "free", "ids": [int(k) for k in keys]})
        self._num_free += len(keys)

    def contains(self, key: PoolKey) -> bool:
        return self._sock is not None and key in self._held and super().contains(key)

    def node_stats(self) -> dict:
        return self._call({"op": "stats"})
