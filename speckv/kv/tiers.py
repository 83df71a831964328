"""The tiers below attention: DEVICE pages backed by an encoded POOL.

    DEVICE  (fast memory, hard budget)  ── store: encode, write ──►  POOL (every sealed page,
        ▲                                                              encoded by the codec)
        └──────────── fetch: read, decode (on demand; counted as stall) ◄──┘
                      or, in place: attention reads the pool row itself

Two ways to read a pooled page (`--kv-read`). *Copy*: fetch it back into a DEVICE
slot, then attend (what a GPU must do: its HBM cannot address host memory at
speed). *In place*: the attention kernel reads the pool row where it lies,
decoding it as it streams (what a CPU can do with host memory, a memory node's
mapped segment or a CXL expander); the page leaves DEVICE as soon as it is stored,
and each read is accounted here, link model included (`read_in_place`).

`TieredStore` does the moves and counts them; `KVCacheManager` decides when, and is
the only owner of placement (which page is where, the eviction policy, its clock). A
sealed page is stored once, when it leaves the residual window; from then on its
DEVICE copy may be evicted (pages never change after sealing, so nothing is
written back). For a lossy codec, the DEVICE copy is replaced by the decoded page
when it is stored, so a page reads the same whether it stayed resident or came
back from the pool: outputs depend on the codec, never on the budget or on
eviction timing (a fetched page is bit-identical to the one it replaced).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from enum import IntEnum
from types import ModuleType

import numpy as np
import torch

from speckv.codecs.base import Codec
from speckv.kv.page_pool import DevicePagePool
from speckv.pool.base import ArenaPool, PoolBackend, PoolKey


class Tier(IntEnum):
    """Where a page is read from, fastest first (so `Tier.DEVICE < Tier.POOL`): what
    `KVCacheManager.tiers` reports; PREFETCH pages are the prefetcher's until promoted."""

    DEVICE = 0
    PREFETCH = 1
    POOL = 2


@dataclass(slots=True)
class TierCounters:
    """Moves between tiers, counted as they happen (cumulative)."""

    pages_stored: int = 0
    raw_bytes_stored: int = 0  # what the stored pages take in the device dtype
    encoded_bytes_stored: int = 0  # what the codec made of them (exact)
    store_seconds: float = 0.0
    pages_fetched: int = 0
    bytes_fetched: int = 0  # encoded bytes read from the pool
    fetches: int = 0  # batched demand fetches (one per layer that missed)
    stall_seconds: float = 0.0  # attention waiting for demand fetches (read + decode)
    evictions: int = 0
    fetches_skipped: int = 0  # pooled pages not fetched because no selection read them
    fetch_bytes_skipped: int = 0  # their encoded bytes
    pages_read_in_place: int = 0  # pool rows attention read where they lie (a page
    #                               that any KV head of a layer read counts once)
    bytes_read_in_place: int = 0  # their encoded bytes

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TierOptions:
    """How pages move: the codec, the unencoded window and what may be evicted."""

    residual_tokens: int = 0  # most recent tokens kept unencoded (their pages pinned)
    keep_sink_page: bool = False  # page 0 never leaves DEVICE and is never encoded


class TieredStore:
    """Encodes pages into the pool and fetches them back into DEVICE slots."""

    def __init__(self, device_pool: DevicePagePool, backend: PoolBackend, codec: Codec,
                 options: TierOptions, kernels: ModuleType | None = None,
                 in_place: bool = False) -> None:
        """`kernels`: the compiled CPU kernels, which read the codec's rows where they lie
        (`Codec.row_format`), to fetch them and, with `in_place`, to attend them.

        Raises:
            ValueError: `in_place` without kernels that can read this codec and pool.
        """
        self.device_pool = device_pool
        self.backend = backend
        self.codec = codec
        self.options = options
        self.counters = TierCounters()
        self.first_stored = 1 if options.keep_sink_page else 0
        self._staging: dict[str, torch.Tensor] = {}  # reused fetch buffers, grown on demand
        row_format = kernel_row_format(kernels, codec, backend, device_pool.kv.device)
        self._kernels = None if row_format is None else kernels
        self.row_format = row_format or 0  # the kernels' number for the codec's rows
        if in_place and self._kernels is None:
            raise ValueError(f"kv_read='in_place' needs the CPU kernels (CPU, float32), a "
                             f"codec they read ({', '.join(readable_codecs())}; not "
                             f"{codec.name!r}) and a local or memnode pool: use kv_read="
                             "'copy' or 'auto'")
        self.in_place = in_place

    def target_stored(self, num_tokens: int) -> int:
        """Pages (after the sink) that must be in the pool for a sequence of `num_tokens`."""
        ps = self.device_pool.page_size
        return max(0, (num_tokens - self.options.residual_tokens) // ps - self.first_stored)

    # ------------------------------------------------------------ store

    def store(self, slots: np.ndarray) -> list[PoolKey]:
        """Encodes the sealed pages in DEVICE `slots` and writes them to new pool keys.

        Raises:
            RuntimeError: the pool has no room (the cache reserves room first: a bug).
        """
        started = time.perf_counter()
        keys = self.backend.allocate(len(slots))
        if keys is None:
            raise RuntimeError("bug: the pool is full although its room was reserved")
        index = torch.from_numpy(slots).to(self.device_pool.kv.device)
        pool = self.device_pool
        encoded = self.codec.encode(pool.k_pages.index_select(0, index),
                                    pool.v_pages.index_select(0, index))
        self.backend.store_batch(keys, encoded.data, encoded.nbytes)
        if not self.codec.lossless and not self.in_place:  # resident = what a fetch brings
            k, v = self.codec.decode(encoded.data)
            pool.k_pages.index_copy_(0, index, k)
            pool.v_pages.index_copy_(0, index, v)
        c = self.counters
        c.pages_stored += len(slots)
        c.raw_bytes_stored += len(slots) * self.codec.shape.raw_bytes
        c.encoded_bytes_stored += int(encoded.nbytes.sum())
        c.store_seconds += time.perf_counter() - started
        return keys

    # ------------------------------------------------------------ fetch

    def fetch(self, keys: list[PoolKey], slots: np.ndarray) -> None:
        """Reads pages `keys` from the pool and decodes them into DEVICE `slots` (a demand
        fetch: the step waits for it, so its time is stall)."""
        started = time.perf_counter()
        pool = self.device_pool
        nbytes = self.read_into(keys, pool, slots, self._staging)
        c = self.counters
        c.fetches += 1
        c.pages_fetched += len(keys)
        c.bytes_fetched += nbytes
        c.stall_seconds += time.perf_counter() - started

    def read_into(self, keys: list[PoolKey], dst: DevicePagePool, slots: np.ndarray,
                  staging: dict[str, torch.Tensor]) -> int:
        """Reads pages `keys` from the pool and decodes them into `dst`'s `slots` (DEVICE,
        or the PREFETCH tier from the prefetch worker's thread, with its own `staging`
        buffers). Returns the encoded bytes read."""
        nbytes = self.backend.stored_bytes(np.asarray(keys, dtype=np.int64))
        index = torch.from_numpy(np.asarray(slots, dtype=np.int64)).to(dst.kv.device)
        n = len(keys)
        if self._kernels is not None:  # one pass: pool rows -> decoded pages
            self.backend.load_into(keys, lambda arena, key_index: self._kernels.fetch_pages(
                arena, self.row_format, key_index, dst.k_pages, dst.v_pages, index))
        else:  # gather rows, decode into reused buffers, scatter into the slots
            rows = self.backend.load_batch(keys, dst.kv.device,
                                           out=self._buffer(staging, "rows", n, cpu=True))
            k, v = self.codec.decode(rows, out=(self._buffer(staging, "k", n),
                                                self._buffer(staging, "v", n)))
            dst.k_pages.index_copy_(0, index, k)
            dst.v_pages.index_copy_(0, index, v)
        return nbytes

    def rows(self) -> torch.Tensor:
        """The pool's rows, uint8 [num_slots, slot_bytes], for kernels that read in place.

        Raises:
            PoolUnavailable: the pool is lost (its rows are not readable)."""
        self.backend.ensure_available()
        return self.backend.arena

    def prefetch_in_place(self, keys: np.ndarray) -> int:
        """Software-prefetches pool rows `keys` into the CPU's caches, for a kernel that
        will read them in place; returns their encoded bytes. Nothing is charged to the
        link model here: the rows are charged when attention reads them."""
        if not len(keys):
            return 0
        self._kernels.prefetch_rows(self.rows(), torch.as_tensor(self.backend.rows(keys)))
        return self.backend.stored_bytes(keys)

    def read_in_place(self, keys: np.ndarray, started: float) -> None:
        """Accounts pool rows `keys` that a kernel began reading at `started` where they
        lie; with a link model, waits out what the link would have taken for them (the
        wait counts as stall: the step waits for data that is not in fast memory)."""
        if not len(keys):
            return
        before = time.perf_counter()
        nbytes = self.backend.read_in_place(keys, started)
        c = self.counters
        c.pages_read_in_place += len(keys)
        c.bytes_read_in_place += nbytes
        c.stall_seconds += time.perf_counter() - before

    def _buffer(self, staging: dict[str, torch.Tensor], name: str, n: int,
                cpu: bool = False) -> torch.Tensor:
        """A reusable buffer of `n` encoded rows (`cpu`, pinned for CUDA) or decoded K/V pages."""
        buf = staging.get(name)
        if buf is None or buf.shape[0] < n:
            n_alloc = max(n, 0 if buf is None else 2 * buf.shape[0])
            kv = self.device_pool.kv
            if cpu:
                buf = torch.empty(n_alloc, self.codec.slot_bytes, dtype=torch.uint8,
                                  pin_memory=kv.device.type == "cuda")
            else:
                buf = torch.empty(n_alloc, *kv.shape[2:], dtype=kv.dtype, device=kv.device)
            staging[name] = buf
        return buf[:n]


def kernel_row_format(kernels: ModuleType | None, codec: Codec, backend: PoolBackend,
                      device: torch.device) -> int | None:
    """The CPU kernels' number for `codec`'s rows (`cpu_kernels.FORMATS`) when they can
    read them where they lie in `backend` (a host arena) for pages on `device`; else None."""
    if (kernels is None or codec.row_format is None or device.type != "cpu"
            or not isinstance(backend, ArenaPool)):
        return None
    from speckv.kv.cpu_kernels import FORMATS

    return FORMATS[codec.row_format]


def readable_codecs() -> list[str]:
    """The codecs whose rows the CPU kernels read in place (float32 pages)."""
    from speckv.codecs.base import CODECS, PageShape

    shape = PageShape(16, 1, 16, torch.float32)
    return [name for name in CODECS.names() if CODECS.get(name)(shape).row_format is not None]
