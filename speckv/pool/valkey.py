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

Stored value per page, all its layers in one (a prefix is found page by page, and
large values are what a pipelined GET moves fastest), under `speckv:{<page key hex>}`::

    header (52 bytes: magic, version, layers, extra size, namespace key, page key,
    XXH3-64 of the rest) ‖ each layer's row size (uint32) ‖ each layer's extra (the
    page's key summary) ‖ each layer's encoded row

The page key already chains from the namespace (`speckv.kv.prefix`); the header
repeats both so that a value under a wrong name is rejected too. Without --pool-url
the engine starts a private local server (`speckv.pool.valkey_server`) of pool_bytes.
"""

from __future__ import annotations

import logging
import struct
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import xxhash

from speckv.pool import resp
from speckv.pool.local import LocalPool

logger = logging.getLogger(__name__)

TIMEOUT_S = 2.0
RETRY_S = 2.0  # time between connection attempts while Valkey is down, doubled after each
MAX_RETRY_S = 30.0  # failed one up to this (a stopped server costs a deadline per attempt)
_MAGIC, _VERSION = b"SKV1", 2
_HEADER = struct.Struct("<4sHHI16s16sQ")  # magic, version, layers, extra, ns, key, xxh3
_BATCH_BYTES = 16 << 20  # payload per pipelined round trip


@dataclass(slots=True)
class SharedStats:
    """What the pool did with Valkey (cumulative, but for `available`)."""

    available: int = 0
    errors: int = 0  # calls that failed (unreachable, deadline, refused)
    pages_published: int = 0  # pages (values) written
    bytes_published: int = 0  # their rows' bytes
    lookups: int = 0  # adopt calls that reached Valkey
    pages_found: int = 0  # pages read, checked and adopted
    bytes_found: int = 0
    pages_rejected: int = 0  # values whose size, header, namespace or checksum was wrong
    publish_seconds: float = 0.0
    lookup_seconds: float = 0.0


def page_name(key: bytes) -> bytes:
    return b"speckv:{%s}" % key.hex().encode()


def _layout(num_layers: int, extra_bytes: int) -> tuple[int, int]:
    """Where a stored value's summaries and rows start (its row sizes follow the header)."""
    extras_at = _HEADER.size + 4 * num_layers
    return extras_at, extras_at + num_layers * extra_bytes


def _row_sizes(values: np.ndarray, num_layers: int) -> np.ndarray:
    """The row sizes stored after the header of each value ([..., value bytes] uint8)."""
    return values[..., _HEADER.size:_HEADER.size + 4 * num_layers].copy().view("<u4")


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
        self._buffer = np.empty(0, dtype=np.uint8)  # what lookups read into (`_staging`)
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
        layers, extra_bytes = pool_keys.shape[1], extras.shape[2]
        commands, size = [], 0
        try:
            for i, key in enumerate(page_keys):
                row_bytes = self._nbytes[pool_keys[i]].astype("<u4")
                rows = [self._rows[k, :n] for k, n in zip(pool_keys[i], row_bytes)]
                extra = np.ascontiguousarray(extras[i])
                digest = xxhash.xxh3_64(row_bytes.tobytes())
                digest.update(extra)
                for row in rows:
                    digest.update(row)
                header = _HEADER.pack(_MAGIC, _VERSION, layers, extra_bytes, root, key,
                                      digest.intdigest())
                commands.append(("SET", page_name(key), (header, row_bytes, extra, *rows)))
                size += int(row_bytes.sum())
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
        """Looks up the longest prefix of `page_keys` that Valkey holds, checked, and
        copies those pages into new keys of this pool (the caller made room for all).
        Returns (pool keys [m, L], extras uint8 [m, L, E]) of the m pages found."""
        found: list[tuple[np.ndarray, np.ndarray]] = []  # per batch: (keys, extras)
        conn = self._connection()
        value_bytes = _layout(num_layers, extra_bytes)[1] + num_layers * self.slot_bytes
        if conn is not None and page_keys:
            started = time.perf_counter()
            self.shared.lookups += 1
            per_batch = max(1, _BATCH_BYTES // value_bytes)
            try:
                for first in range(0, len(page_keys), per_batch):
                    batch = page_keys[first:first + per_batch]
                    values = self._staging(len(batch), value_bytes)
                    sizes = conn.get_into(
                        [page_name(k) for k in batch],
                        lambda i, size: memoryview(values[i])[:size] if size <= value_bytes
                        else None)
                    complete = self._checked(root, batch, values, sizes, num_layers, extra_bytes)
                    if complete:
                        found.append(self._take(values[:complete], num_layers, extra_bytes))
                    if complete < len(batch):
                        break
            except (resp.RespError, resp.ReplyError) as exc:
                self._failed(exc)
            self.shared.lookup_seconds += time.perf_counter() - started
        if not found:
            return (np.zeros((0, num_layers), dtype=np.int64),
                    np.zeros((0, num_layers, extra_bytes), dtype=np.uint8))
        keys = np.concatenate([k for k, _ in found])
        self.shared.pages_found += len(keys)
        return keys, np.concatenate([e for _, e in found])

    def _take(self, values: np.ndarray, num_layers: int, extra_bytes: int
              ) -> tuple[np.ndarray, np.ndarray]:
        """Copies checked values' rows into new keys of this pool: (keys [n, L], extras)."""
        n, (extras_at, rows_at) = len(values), _layout(num_layers, extra_bytes)
        keys = self.allocate(n * num_layers)
        if keys is None:
            raise RuntimeError("bug: adopting pages into a pool without room for them")
        grid = np.asarray(keys, dtype=np.int64).reshape(n, num_layers)
        sizes = _row_sizes(values, num_layers)
        extras = values[:, extras_at:rows_at].reshape(n, num_layers, extra_bytes).copy()
        if (sizes == self.slot_bytes).all():  # fixed-size rows: one copy for them all
            self._rows[grid] = values[:, rows_at:].reshape(n, num_layers, self.slot_bytes)
        else:
            for i in range(n):
                offset = rows_at
                for layer, size in enumerate(sizes[i].tolist()):
                    self._rows[grid[i, layer], :size] = values[i, offset:offset + size]
                    offset += size
        self._nbytes[grid.reshape(-1)] = sizes.reshape(-1)
        self.counters.encoded_bytes += int(sizes.sum())
        self.shared.bytes_found += int(sizes.sum())
        return grid, extras

    def _staging(self, pages: int, value_bytes: int) -> np.ndarray:
        """A buffer for `pages` values, kept between lookups (its memory already mapped)."""
        need = pages * value_bytes
        if self._buffer.size < need:
            self._buffer = np.empty(max(need, _BATCH_BYTES + value_bytes), dtype=np.uint8)
        return self._buffer[:need].reshape(pages, value_bytes)

    def _checked(self, root: bytes, page_keys: list[bytes], values: np.ndarray,
                 sizes: list[int | None], num_layers: int, extra_bytes: int) -> int:
        """How many leading pages are there and valid."""
        for i, key in enumerate(page_keys):
            size = sizes[i]
            if size is None:
                return i
            why = "too large" if size > values.shape[1] else \
                self._invalid(values[i, :size], root, key, num_layers, extra_bytes)
            if why is not None:
                self.shared.pages_rejected += 1
                logger.warning("Valkey page %s rejected (%s): recomputed", key.hex(), why)
                return i
        return len(page_keys)

    def _invalid(self, value: np.ndarray, root: bytes, key: bytes, num_layers: int,
                 extra_bytes: int) -> str | None:
        """Why a stored value may not be read (None: it may)."""
        extras_at, rows_at = _layout(num_layers, extra_bytes)
        if len(value) < extras_at:
            return "too short"
        magic, version, layers, extra, ns, got_key, digest = _HEADER.unpack_from(value)
        if magic != _MAGIC or version != _VERSION:
            return "not a speckv page of this version"
        if ns != root:
            return "another namespace (model, dtype, codec or page size)"
        if got_key != key:
            return "stored under another page's name"
        rows = _row_sizes(value, num_layers)
        if layers != num_layers or extra != extra_bytes or (rows > self.slot_bytes).any() \
                or len(value) != rows_at + int(rows.sum()):
            return "wrong size"
        if xxhash.xxh3_64_intdigest(value[_HEADER.size:]) != digest:
            return "checksum mismatch"
        return None


def _expect_ok(replies: list[object]) -> None:
    for reply in replies:
        if isinstance(reply, resp.ReplyError):
            raise reply

