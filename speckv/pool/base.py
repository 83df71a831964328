"""The pool-backend seam: store and load encoded pages by key.

A backend is an arena of equal slots (`slot_bytes` = the codec's row width): the
KV cache allocates keys, stores encoded rows under them, loads rows back and frees
the keys. Batched calls are the primitive (one gather moves a layer's pages);
the single-page forms loop over them, as LMCache's backends do.

    allocate(n) -> keys | None   store_batch(keys, rows, nbytes)   load_batch(keys) -> rows
    contains(key)                free(keys)                        stats()

A new backend is one subclass plus one line in `POOLS`.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, NewType, TypeVar

import numpy as np
import torch

from speckv.pool.link import LinkProfile, wait_until
from speckv.registry import Registry

PoolKey = NewType("PoolKey", int)
T = TypeVar("T")


class PoolUnavailable(RuntimeError):
    """The pool cannot be reached (the memory node died or was never started)."""


@dataclass(slots=True)
class PoolStats:
    """What a pool backend did, counted as it happened."""

    slots_total: int = 0
    slots_used: int = 0
    slot_bytes: int = 0
    encoded_bytes: int = 0  # exact encoded size of the pages held now
    pages_stored: int = 0
    pages_loaded: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    link_wait_seconds: float = 0.0  # time added by the link model on top of the real copy

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


class PoolBackend(ABC):
    """Encoded pages in equal slots, addressed by `PoolKey`."""

    name: str = ""
    last_error: str | None = None  # why the pool was lost, while it is
    shares_pages: bool = False  # publishes cached pages for other engines (`publish`, `adopt`)
    reconnected: bool = False  # a sharing backend's server came back (and may have lost pages)

    def __init__(self, slot_bytes: int) -> None:
        self.slot_bytes = slot_bytes
        self.counters = PoolStats(slot_bytes=slot_bytes)

    @property
    @abstractmethod
    def num_slots(self) -> int: ...

    @property
    @abstractmethod
    def num_free(self) -> int: ...

    @abstractmethod
    def allocate(self, n: int) -> list[PoolKey] | None:
        """Reserves `n` keys, or returns None (nothing reserved) when the pool lacks room."""

    @abstractmethod
    def free(self, keys: list[PoolKey]) -> None: ...

    @abstractmethod
    def store_batch(self, keys: list[PoolKey], rows: torch.Tensor, nbytes: torch.Tensor) -> None:
        """Writes encoded rows (uint8 [n, slot_bytes]; `nbytes` [n] exact sizes) under `keys`."""

    @abstractmethod
    def load_batch(self, keys: list[PoolKey], device: torch.device,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Reads the rows stored under `keys` -> uint8 [n, slot_bytes] on `device`
        (into `out`, a host buffer of that shape, when given)."""

    @abstractmethod
    def contains(self, key: PoolKey) -> bool:
        """True when a page has been stored under `key` and not freed."""

    def stored_bytes(self, keys: np.ndarray) -> int:
        """Exact encoded bytes stored under `keys` (what loading them would move)."""
        return len(keys) * self.slot_bytes

    def store(self, key: PoolKey, row: torch.Tensor, nbytes: int) -> None:
        self.store_batch([key], row[None], torch.tensor([nbytes]))

    def load(self, key: PoolKey, device: torch.device) -> torch.Tensor:
        return self.load_batch([key], device)[0]

    def stats(self) -> PoolStats:
        self.counters.slots_total = self.num_slots
        self.counters.slots_used = self.num_slots - self.num_free
        return self.counters

    @property
    def is_available(self) -> bool:
        """False once the pool was lost (until `revive` reconnects it)."""
        return True

    def ensure_available(self) -> None:
        """Raises PoolUnavailable when the pool cannot serve."""

    def ping(self) -> None:
        """Raises PoolUnavailable unless the pool answers now, within its deadline."""
        self.ensure_available()

    def revive(self) -> None:
        """Reconnects a lost pool (raises PoolUnavailable if it cannot)."""

    def close(self) -> None:
        """Releases the pool's memory or connection."""

    # a backend that `shares_pages` with other engines (e.g. `valkey`) implements these

    def publish(self, root: bytes, page_keys: list[bytes], pool_keys: np.ndarray,
                extras: np.ndarray) -> None:
        """Offers pages held under `pool_keys` [n, L] to other engines under their content
        keys, each row with its `extras` (uint8 [n, L, E]); failures are the backend's."""

    def adopt(self, root: bytes, page_keys: list[bytes], num_layers: int,
              extra_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        """The longest prefix of `page_keys` that other engines offered, copied into new
        keys here: (pool keys [m, L], extras uint8 [m, L, E])."""
        return np.zeros((0, num_layers), dtype=np.int64), \
            np.zeros((0, num_layers, extra_bytes), dtype=np.uint8)

    def shared_stats(self) -> dict[str, int | float | str]:
        """Counters of the sharing with other engines (none by default)."""
        return {}


class ArenaPool(PoolBackend):
    """A backend whose slots are rows of one host uint8 tensor `arena` [num_slots, slot_bytes].

    Subclasses provide the arena and the key allocation; this class copies rows in
    and out with one gather or scatter per batch and applies the link model.
    """

    def __init__(self, slot_bytes: int, link: LinkProfile | None = None) -> None:
        super().__init__(slot_bytes)
        self.link = link
        self.arena: torch.Tensor | None = None
        self._nbytes: np.ndarray = np.zeros(0, dtype=np.int64)  # per slot; 0 = not stored
        self._count_lock = threading.Lock()  # loads also run on the prefetch worker

    def _attach_arena(self, arena: torch.Tensor) -> None:
        self.arena = arena
        self._nbytes = np.zeros(arena.shape[0], dtype=np.int64)

    @property
    def num_slots(self) -> int:
        return 0 if self.arena is None else self.arena.shape[0]

    @staticmethod
    def rows(keys: np.ndarray) -> np.ndarray:
        """The arena rows that hold `keys`, for kernels that read them in place (an arena's
        keys are its row numbers; callers other than this class treat keys as opaque)."""
        return keys

    def _forget(self, keys: list[PoolKey]) -> None:
        index = np.asarray(keys, dtype=np.int64)
        self.counters.encoded_bytes -= int(self._nbytes[index].sum())
        self._nbytes[index] = 0

    def stored_bytes(self, keys: np.ndarray) -> int:
        return int(self._nbytes[np.asarray(keys, dtype=np.int64)].sum())

    def contains(self, key: PoolKey) -> bool:
        return 0 <= key < self._nbytes.size and self._nbytes[key] > 0

    def store_batch(self, keys: list[PoolKey], rows: torch.Tensor, nbytes: torch.Tensor) -> None:
        self.ensure_available()
        started = time.perf_counter()
        index = torch.as_tensor(keys, dtype=torch.int64)
        self.arena.index_copy_(0, index, rows.to("cpu", non_blocking=False))
        sizes = nbytes.numpy().astype(np.int64)
        total = int(sizes.sum())
        self._charge(started, total)
        self.counters.encoded_bytes += total - int(self._nbytes[index.numpy()].sum())
        self._nbytes[index.numpy()] = sizes
        self.counters.pages_stored += len(keys)
        self.counters.bytes_written += total

    def load_batch(self, keys: list[PoolKey], device: torch.device,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        def gather(arena: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            # into a reused buffer: a fresh one page-faults on every byte (~20x slower)
            return torch.index_select(arena, 0, index, out=out) if out is not None else \
                arena.index_select(0, index)

        rows = self.load_into(keys, gather)
        return rows.to(device, non_blocking=device.type == "cuda")

    def load_into(self, keys: list[PoolKey], consume: Callable[[torch.Tensor, torch.Tensor], T]) -> T:
        """Reads pages in place: calls `consume(arena, key_index)` (a kernel that reads the
        rows it needs straight from the arena), accounting and link model included."""
        self.ensure_available()
        started = time.perf_counter()
        index = torch.as_tensor(keys, dtype=torch.int64)
        sizes = self._nbytes[index.numpy()]
        if not sizes.all():
            raise RuntimeError("bug: loading a pool key under which nothing is stored")
        result = consume(self.arena, index)
        total = int(sizes.sum())
        self._charge(started, total)
        with self._count_lock:
            self.counters.pages_loaded += len(keys)
            self.counters.bytes_read += total
        return result

    def read_in_place(self, keys: np.ndarray, started: float) -> int:
        """Accounts rows under `keys` that a kernel read where they lie, beginning at
        `started`, the link model included; returns their bytes."""
        self.ensure_available()
        total = self.stored_bytes(keys)
        self._charge(started, total)
        with self._count_lock:
            self.counters.pages_loaded += len(keys)
            self.counters.bytes_read += total
        return total

    def _charge(self, started: float, nbytes: int) -> None:
        if self.link is None:
            return
        before = time.perf_counter()
        wait_until(started + self.link.seconds(nbytes))
        with self._count_lock:
            self.counters.link_wait_seconds += time.perf_counter() - before


POOLS: Registry[type[PoolBackend]] = Registry("pool backend", {
    "local": "speckv.pool.local:LocalPool",
    "memnode": "speckv.pool.memnode:MemNodePool",
    "valkey": "speckv.pool.valkey:ValkeyPool",
})
register_pool = POOLS.register
