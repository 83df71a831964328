"""`valkey`: a local pool whose prefix-cached pages are shared with other engines through
a Valkey (or Redis) server.

The pages this engine's sequences read stay in a local arena (`LocalPool`: read in
place or copied, the F7 data path unchanged); Valkey is the shared tier behind it.
Every page the prefix cache registers in the pool is also written to Valkey under
its content key, and a prompt whose prefix this engine lacks looks the rest up there
(`adopt`): pages found are checked and copied into the arena, then shared like any
cached page. So two `speckv serve` processes on one Valkey — one machine or many —
reuse each other's prefixes, and whatever happens to Valkey, no running request
loses a page:

    down, slow, refused   -> calls fail within `timeout`, counted; a warning once per
                             outage; lookups miss (prefill runs), writes are dropped;
                             reconnection is tried every RETRY_S; /health: degraded
    a page whose bytes, checksum or namespace do not match -> a miss, never read

Stored value per (page, layer), under `speckv:{<page key hex>}:<layer>` (the braces
are a cluster hash tag: one page's layers on one node)::

    header (52 bytes: magic, version, layer, extra and row sizes, namespace key,
    page key, CRC32 of the rest) ‖ extra (the page's key summary) ‖ encoded row

The page key already chains from the namespace (`speckv.kv.prefix`); the header
repeats both so that a value under a wrong name is rejected too. Without --pool-url
the engine starts a private local server (`speckv.pool.valkey_server`) of pool_bytes.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from dataclasses import asdict, dataclass

import numpy as np
import torch

from speckv.pool import resp
from speckv.pool.local import LocalPool

logger = logging.getLogger(__name__)

TIMEOUT_S = 2.0
RETRY_S = 2.0  # time between connection attempts while Valkey is down, doubled after each
MAX_RETRY_S = 30.0  # failed one up to this (a stopped server costs a deadline per attempt)
_MAGIC, _VERSION = b"SKV1", 1
_HEADER = struct.Struct("<4sHHII16s16sI")  # magic, version, layer, extra, row, ns, key, crc
_BATCH_BYTES = 16 << 20  # payload per pipelined round trip


@dataclass(slots=True)
class SharedStats:
    """What the pool did with Valkey (cumulative, but for `available`)."""

    available: int = 0
    errors: int = 0  # calls that failed (unreachable, deadline, refused)
    pages_published: int = 0  # (page, layer) values written
    bytes_published: int = 0
    lookups: int = 0  # adopt calls that reached Valkey
    pages_found: int = 0  # (page, layer) values read, checked and adopted
    bytes_found: int = 0
    pages_rejected: int = 0  # values whose size, header, namespace or checksum was wrong
    publish_seconds: float = 0.0
    lookup_seconds: float = 0.0


def page_name(key: bytes, layer: int) -> bytes:
    return b"speckv:{%s}:%d" % (key.hex().encode(), layer)


class ValkeyPool(LocalPool):
    """A local arena, write-through and read-through to Valkey for content-keyed pages."""

    shares_pages = True

    def __init__(self, slot_bytes: int, capacity_bytes: int, *, device: torch.device,
                 url: str | None = None, valkey_timeout: float = TIMEOUT_S,
                 numa_node: int | None = None, **_: object) -> None:
        super().__init__(slot_bytes, capacity_bytes, device=device, numa_node=numa_node)
        self.timeout = valkey_timeout
        self.server = None
        if url is None:
            from speckv.pool.valkey_server import LocalValkey

            self.server = LocalValkey(capacity_bytes)
            self.address = self.server.address
        else:
            self.address = resp.parse_url(url)
        self.shared = SharedStats()
        self.shared_error: str | None = None
        self._conn: resp.Connection | resp.ClusterConnection | None = None
        self._retry_at = 0.0
        self._retry_s = RETRY_S
        self._outage = False
        self._rows = self.arena.numpy()  # shares memory with the arena
        if self._connection() is not None:
            logger.info("sharing prefix-cached pages through Valkey at %s", self.address)

    # ------------------------------------------------------------ connection

    def _connection(self) -> resp.Connection | resp.ClusterConnection | None:
        """The connection, (re)connecting when it is down and a retry is due; None while
        Valkey cannot be reached."""
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._retry_at:
            return None
        try:
            if self.server is not None and not self.server.running:
                logger.warning("restarting the local Valkey server")
                self.server.start()
            self._conn = resp.connect(self.address, self.timeout)
        except (resp.RespError, ValueError) as exc:
            self._failed(exc)
            return None
        if self._outage:
            logger.warning("Valkey at %s is back: prefix pages are shared again", self.address)
            self.reconnected = True
        self._outage, self.shared_error, self.shared.available = False, None, 1
        self._retry_s = RETRY_S
        return self._conn

    def _failed(self, exc: Exception) -> None:
        """A call failed: the connection is dropped, retried RETRY_S later."""
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        self._retry_at = time.monotonic() + self._retry_s
        if self._outage:
            self._retry_s = min(2 * self._retry_s, MAX_RETRY_S)
        self.shared.errors += 1
        self.shared.available = 0
        self.shared_error = str(exc)
        if not self._outage:
            logger.warning("Valkey at %s is unavailable (%s): prefix pages are not shared "
                           "until it is back; requests go on", self.address, exc)
        self._outage = True

    def ping(self) -> None:
        """Checks Valkey within the deadline (reconnecting when due); never raises: the
        local arena, all that running requests read, is always there."""
        conn = self._connection()
        if conn is None:
            return
        try:
            conn.call("PING")
        except (resp.RespError, resp.ReplyError) as exc:
            self._failed(exc)

    def shared_stats(self) -> dict[str, int | float | str]:
        stats: dict[str, int | float | str] = {f"valkey_{k}": v
                                               for k, v in asdict(self.shared).items()}
        if self.shared_error is not None:
            stats["valkey_error"] = self.shared_error
        return stats

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.server is not None:
            self.server.stop()

    # ------------------------------------------------------------ pages

    def publish(self, root: bytes, page_keys: list[bytes], pool_keys: np.ndarray,
                extras: np.ndarray) -> None:
        """Writes pages held here under their content keys: `pool_keys` [n, L] their
        keys in this pool, `extras` uint8 [n, L, E] what is stored beside each row."""
        conn = self._connection()
        if conn is None or not page_keys:
            return
        started = time.perf_counter()
        commands, size = [], 0
        try:
            for i, key in enumerate(page_keys):
                for layer, pool_key in enumerate(pool_keys[i]):
                    row = self._rows[pool_key, :self._nbytes[pool_key]]
                    extra = extras[i, layer]
                    crc = zlib.crc32(row, zlib.crc32(extra))
                    header = _HEADER.pack(_MAGIC, _VERSION, layer, extra.size, row.size, root,
                                          key, crc)
                    commands.append(("SET", page_name(key, layer), (header, extra, row)))
                    size += row.size
                if size >= _BATCH_BYTES or i == len(page_keys) - 1:
                    _expect_ok(conn.pipeline(commands))
                    self.shared.pages_published += len(commands)
                    self.shared.bytes_published += size
                    commands, size = [], 0
        except (resp.RespError, resp.ReplyError) as exc:
            self._failed(exc)
        self.shared.publish_seconds += time.perf_counter() - started

    def adopt(self, root: bytes, page_keys: list[bytes], num_layers: int,
              extra_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """Looks up the longest prefix of `page_keys` whose every layer Valkey holds, checked,
        and copies those pages into new keys of this pool (the caller made room for all).
        Returns (pool keys [m, L], extras uint8 [m, L, E]) of the m pages found."""
        found: list[tuple[np.ndarray, np.ndarray]] = []  # per batch: its values, their sizes
        conn = self._connection()
        value_bytes = _HEADER.size + extra_bytes + self.slot_bytes
        if conn is not None and page_keys:
            started = time.perf_counter()
            self.shared.lookups += 1
            per_batch = max(1, _BATCH_BYTES // (num_layers * value_bytes))
            try:
                for first in range(0, len(page_keys), per_batch):
                    batch = page_keys[first:first + per_batch]
                    values = np.empty((len(batch) * num_layers, value_bytes), dtype=np.uint8)
                    sizes = conn.get_into(
                        [page_name(k, layer) for k in batch for layer in range(num_layers)],
                        lambda i, size: memoryview(values[i])[:size] if size <= value_bytes
                        else None)
                    complete = self._checked(root, batch, values, sizes, num_layers, extra_bytes)
                    found.append((values[:complete * num_layers], sizes[:complete * num_layers]))
                    if complete < len(batch):
                        break
            except (resp.RespError, resp.ReplyError) as exc:
                self._failed(exc)
            self.shared.lookup_seconds += time.perf_counter() - started
        m = sum(len(sizes) for _, sizes in found) // num_layers
        keys = self.allocate(m * num_layers) if m else []
        if keys is None:
            raise RuntimeError("bug: adopting pages into a pool without room for them")
        keys = np.asarray(keys, dtype=np.int64).reshape(m, num_layers)
        extras = np.empty((m, num_layers, extra_bytes), dtype=np.uint8)
        rows = np.concatenate([np.asarray(sizes, dtype=np.int64) for _, sizes in found]) \
            - _HEADER.size - extra_bytes if m else np.zeros(0, dtype=np.int64)
        offset = 0
        for values, _ in found:
            n = len(values)
            flat = keys.reshape(-1)[offset:offset + n]
            extras.reshape(-1, extra_bytes)[offset:offset + n] = \
                values[:, _HEADER.size:_HEADER.size + extra_bytes]
            self._rows[flat] = values[:, _HEADER.size + extra_bytes:]  # (past a row's size: junk)
            offset += n
        self.counters.encoded_bytes += int(rows.sum())
        self._nbytes[keys.reshape(-1)] = rows
        self.shared.pages_found += m * num_layers
        self.shared.bytes_found += int(rows.sum())
        return keys, extras

    def _checked(self, root: bytes, page_keys: list[bytes], values: np.ndarray,
                 sizes: list[int | None], num_layers: int, extra_bytes: int) -> int:
        """How many leading pages have all their layers there and valid."""
        for i, key in enumerate(page_keys):
            for layer in range(num_layers):
                j = i * num_layers + layer
                size = sizes[j]
                if size is None:
                    return i
                why = "too large" if size > values.shape[1] else \
                    self._invalid(memoryview(values[j])[:size], root, key, layer, extra_bytes)
                if why is not None:
                    self.shared.pages_rejected += 1
                    logger.warning("Valkey page %s layer %d rejected (%s): recomputed",
                                   key.hex(), layer, why)
                    return i
        return len(page_keys)

    def _invalid(self, value: memoryview, root: bytes, key: bytes, layer: int,
                 extra_bytes: int) -> str | None:
        """Why a stored value may not be read (None: it may)."""
        if len(value) < _HEADER.size:
            return "too short"
        magic, version, got_layer, extra, row, ns, got_key, crc = _HEADER.unpack_from(value)
        if magic != _MAGIC or version != _VERSION:
            return "not a speckv page of this version"
        if ns != root:
            return "another namespace (model, dtype, codec or page size)"
        if got_key != key or got_layer != layer:
            return "stored under another page's name"
        if extra != extra_bytes or row > self.slot_bytes or len(value) != _HEADER.size + extra + row:
            return "wrong size"
        if zlib.crc32(value[_HEADER.size:]) != crc:
            return "checksum mismatch"
        return None


def _expect_ok(replies: list[object]) -> None:
    for reply in replies:
        if isinstance(reply, resp.ReplyError):
            raise reply

