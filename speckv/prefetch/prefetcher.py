"""The prefetcher: asks the predictors, issues transfers to the worker, hands prefetched
pages to the steps that demand them, and counts everything.

Read in place (`kv_read`), there is no PREFETCH tier and no worker: a hint becomes a
software prefetch of the hinted pool rows into the CPU's caches (`speckv.prefetch.warm`),
and `consumed` tells the prefetcher which rows attention then read.

    StepAttention ── begin_step / layer_input / after_read ──► Prefetcher ──► predictors
                                                                   │  hints: pool keys of
                                                                   ▼  pages in Tier.POOL
    cache.prepare_load ─► promote(plan) ◄── PREFETCH tier ◄── TransferWorker
                              └─► cache.complete_load (fetches what was not promoted)

Counted per predictor (the one whose hint issued a page), and overall with
`demand_misses` (pool pages a step fetched itself) and `hit_rate` = used / (used +
demand misses):
    issued   pages sent to the worker (in place: rows software-prefetched)
    used     prefetched pages a step demanded (then promoted: their slots handed to DEVICE;
             in place: hinted rows attention read)
    late     used pages the step had to wait for (demanded while being transferred)
    overtaken  prefetched pages demanded before the worker began their transfer: the
             step fetched them itself (so they are demand misses too), never waiting
             behind the worker's queue
    wasted   prefetched pages dropped unused (room needed, or their page was freed)
    no_room  hinted pages not issued: the tier was full of pages in flight
    predicted / predicted_read / read: the hinted page sets against the pages the
             target layer really read (precision = predicted_read / predicted,
             recall = predicted_read / read), over layers that select pages (a dense
             layer reads every page: predicting it is trivial, so it is not scored)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from speckv.config import PrefetchConfig
from speckv.kv.cache import KVCacheManager, LoadPlan
from speckv.kv.tiers import Tier, TieredStore
from speckv.prefetch.buffer import PrefetchBuffer, Transfer
from speckv.prefetch.predictors import Hint, Predictor, StepView, make_predictors
from speckv.prefetch.warm import WarmSet
from speckv.prefetch.worker import TransferWorker

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class PrefetchCounters:
    """One predictor's prefetches, cumulative."""

    issued: int = 0
    used: int = 0
    late: int = 0
    overtaken: int = 0
    wasted: int = 0
    no_room: int = 0
    failed: int = 0
    bytes_read: int = 0  # encoded bytes moved POOL -> PREFETCH
    predicted: int = 0
    predicted_read: int = 0
    read: int = 0

    def add(self, other: "PrefetchCounters") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


class Prefetcher:
    """Speculative, asynchronous page movement POOL -> PREFETCH -> DEVICE for one engine
    (read in place: POOL -> the CPU's caches)."""

    def __init__(self, store: TieredStore, config: PrefetchConfig, num_layers: int) -> None:
        self.store = store
        self.config = config
        self.num_layers = num_layers
        device_pool = store.device_pool
        self.page_bytes = device_pool.kv[:, 0].numel() * device_pool.kv.element_size()
        self.num_slots = device_pool.num_spare  # prefetch_bytes' worth, in DEVICE's tensor
        self.in_place = store.in_place  # hints prefetch rows into the caches, no copies
        self.predictors: list[Predictor] = []
        self.counters: dict[str, PrefetchCounters] = {}
        self.late_wait_seconds = 0.0
        self.pages_promoted = 0
        self.demand_misses = 0  # demanded pool pages not prefetched (once prefetching began)
        self._lock = threading.Lock()  # counters the worker updates
        self._buffer: PrefetchBuffer | None = None
        self.worker: TransferWorker | None = None  # made with the PREFETCH tier
        self._warm: WarmSet | None = None  # in place: the rows hinted and not read yet
        self._sources: list[str] = []  # predictor names, by the index pages carry
        self._view: StepView | None = None
        self._cache: KVCacheManager | None = None
        self._pending: dict[tuple[int, int], list[tuple[str, list[str], np.ndarray]]] = {}
        self._step = 0
        self.set_predictors(config.predictors, config.prefetch_depth)

    # ------------------------------------------------------------ set-up

    @property
    def active(self) -> bool:
        return bool(self.predictors)

    @property
    def reads_inputs(self) -> bool:
        """Whether a predictor wants each layer's input (`layer_input`)."""
        return any(p.uses_layer_input for p in self.predictors)

    def set_predictors(self, names: tuple[str, ...], depth: int | None = None) -> None:
        """Switches predictors (none: `()`); pages prefetched so far are dropped (wasted).

        Raises:
            ValueError: an unknown predictor or a depth not below the layer count.
        """
        depth = self.config.prefetch_depth if depth is None else depth
        predictors = make_predictors(names, depth, self.num_layers)
        if predictors and self.num_slots == 0 and not self.in_place:
            logger.warning("prefetch_bytes=%d holds no page (%d bytes): prefetch disabled",
                           self.config.prefetch_bytes, self.page_bytes)
            predictors = []
        self._drop_all()
        self.predictors = predictors
        for p in predictors:
            self.counters.setdefault(p.name, PrefetchCounters())
        if predictors:
            self.start()

    def start(self) -> None:
        """Makes the PREFETCH tier and its worker, or in place the set of hinted rows
        (once; done by the first prefetch)."""
        if self._buffer is not None or self._warm is not None:
            return
        if self.in_place:
            self._warm = WarmSet(self.store.backend.num_slots)
            return
        if self.num_slots == 0:
            raise ValueError("prefetch_bytes holds no page: nothing can be prefetched")
        self._buffer = PrefetchBuffer(self.store.device_pool.spare_pool(),
                                      self.store.backend.num_slots)
        self.worker = TransferWorker(self.store, self._buffer, self._transferred)

    def close(self) -> None:
        self._drop_all()
        if self.worker is not None:
            self.worker.close()
            self.worker = None

    def _drop_all(self) -> None:
        if self._buffer is not None:
            self.worker.drain()
            self.forget(self._buffer.keys())
        if self._warm is not None:
            with self._lock:
                self._count("wasted", self._warm.clear())
        self._pending.clear()

    def drain(self) -> None:
        """Waits for every transfer in flight (tests, and before checking the tiers)."""
        if self.worker is not None:
            self.worker.drain()

    # ------------------------------------------------------------ the step's hooks

    def begin_step(self, view: StepView, cache: KVCacheManager) -> None:
        self._step += 1
        view.step = self._step
        self._view, self._cache = view, cache
        for p in self.predictors:
            p.begin_step(view)

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        """Layer `layer` is about to run on `x`: predictors that read inputs hint now."""
        for p in self.predictors:
            if p.uses_layer_input:
                self._issue(p.name, p.at_layer_input(self._view, layer, x))

    def after_read(self, layer: int, read: np.ndarray | None) -> None:
        """Layer `layer` has its pages ([B, P] mask; None: all): score the hints made for
        it, then ask for the next ones (issued while this layer computes)."""
        view = self._view
        read = view.all_pages if read is None else read & view.all_pages
        self._evaluate(layer, read)
        for p in self.predictors:
            self._issue(p.name, p.after_read(view, layer, read))

    def end_step(self) -> None:
        if self._warm is not None:  # hinted for this step or before, and not read
            with self._lock:
                self._count("wasted", self._warm.expire(self._step))
        self._view, self._cache = None, None
        stale = [k for k in self._pending if k[0] < self._step + 1]
        for k in stale:  # hints whose target layer never ran (e.g. the batch changed)
            del self._pending[k]

    # ------------------------------------------------------------ issue

    def _issue(self, source: str, hints: list[Hint]) -> None:
        view = self._view
        for hint in hints:
            if not view.dense(hint.layer).all():  # dense layers are predicted trivially
                step = view.step + int(hint.next_step)
                self._pending.setdefault((step, hint.layer), []).append(
                    (source, view.request_ids, hint.pages))
            self.prefetch(self._absent_keys(hint), source)

    def prefetch(self, keys: np.ndarray | list[int], source: str) -> int:
        """Starts moving pooled pages `keys` into the PREFETCH tier on the worker (keys
        there already are skipped; when the tier is full of pages in flight, the rest
        are not issued: `no_room`). Returns how many were issued."""
        keys = np.asarray(keys, dtype=np.int64)
        if not keys.size:
            return 0
        self.start()
        if self._warm is not None:
            return self._prefetch_in_place(keys, source)
        transfer, dropped, no_room = self._buffer.prepare(keys, self._source_id(source))
        issued = 0 if transfer is None else transfer.keys.size
        with self._lock:
            c = self.counters.setdefault(source, PrefetchCounters())
            c.issued += issued
            c.no_room += no_room
            self._count("wasted", dropped)
        self.worker.submit(transfer)
        return issued

    def _prefetch_in_place(self, keys: np.ndarray, source: str) -> int:
        new = self._warm.issue(keys, self._source_id(source), self._step)
        nbytes = self.store.prefetch_in_place(new)
        c = self.counters.setdefault(source, PrefetchCounters())
        c.issued += new.size
        c.bytes_read += nbytes
        return int(new.size)

    def consumed(self, keys: np.ndarray) -> None:
        """In place: attention read pool rows `keys` where they lie (hinted ones: used;
        the rest: demand misses)."""
        if self._warm is None or not len(keys):
            return
        used = self._warm.consume(keys)
        with self._lock:
            self._count("used", used)
        self.demand_misses += int(len(np.unique(keys)) - used.size)

    def _source_id(self, name: str) -> int:
        """The index pages carry for predictor `name` (PREFETCH tier and hinted rows)."""
        if name not in self._sources:
            self._sources.append(name)
        return self._sources.index(name)

    def _absent_keys(self, hint: Hint) -> np.ndarray:
        """Pool keys of the hinted pages that are read from the pool (`Tier.POOL`)."""
        P = hint.pages.shape[1]
        keys, tiers = self._cache.pool_keys(hint.layer, self._view.request_ids, P)
        return keys[hint.pages & (tiers == Tier.POOL)]

    def _transferred(self, transfer: Transfer, pages: int, nbytes: int, ok: bool) -> None:
        with self._lock:
            c = self.counters[self._sources[transfer.source]]
            c.bytes_read += nbytes
            if not ok:
                c.failed += pages

    def _count(self, name: str, sources: np.ndarray) -> None:
        """Adds one to counter `name` of each page's predictor (under `_lock`)."""
        if sources.size:
            for i, n in enumerate(np.bincount(sources).tolist()):
                if n:
                    c = self.counters[self._sources[i]]
                    setattr(c, name, getattr(c, name) + n)

    # ------------------------------------------------------------ demand side

    def promote(self, plan: LoadPlan) -> None:
        """Between `cache.prepare_load` and `complete_load`: the plan's pages that are
        prefetched go to DEVICE in their PREFETCH slots (`adopt`), marked promoted."""
        plan.promoted[:] = self.adopt(plan.keys, plan.slots)

    def adopt(self, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Hands the prefetched pages among demanded pool `keys` over to DEVICE, without a
        copy: for each, DEVICE gives the PREFETCH tier the free slot it had taken for the
        page (`slots[i]`) and takes the prefetched page's slot instead (written into
        `slots`). Waits for pages being transferred (late); a page whose transfer has
        not begun is overtaken (the step fetches it itself: a demand miss, as is a page
        not prefetched).

        Returns:
            [n] bool: the pages promoted (the rest are the caller's to fetch).
        """
        keys = np.asarray(keys, dtype=np.int64)
        if self._buffer is None:
            return np.zeros(keys.size, dtype=bool)
        overtaken, moving, transfers = self._buffer.claim(keys)
        if transfers:
            started = time.perf_counter()
            for t in transfers:
                t.done.wait()
            waited = time.perf_counter() - started
            self.late_wait_seconds += waited
            self.store.counters.stall_seconds += waited
        hit, prefetched, sources = self._buffer.take(keys)
        if hit.any():
            given = slots[hit]
            self.store.device_pool.exchange(given, prefetched)
            self._buffer.exchange(prefetched, given)
            slots[hit] = prefetched
            self.pages_promoted += prefetched.size
        late = sources[np.isin(keys[hit], moving)] if moving.size else sources[:0]
        with self._lock:
            self._count("overtaken", overtaken)
            self._count("used", sources)
            self._count("late", late)
        self.demand_misses += int(keys.size - hit.sum())
        return hit

    def forget(self, keys: np.ndarray | list[int]) -> None:
        """Pool keys being freed: their prefetched pages are dropped (wasted)."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._warm is not None and keys.size:
            with self._lock:
                self._count("wasted", self._warm.forget(keys))
        if self._buffer is None or not keys.size:
            return
        dropped = self._buffer.forget(keys)
        with self._lock:
            self._count("wasted", dropped)

    # ------------------------------------------------------------ accounting

    def _evaluate(self, layer: int, read: np.ndarray) -> None:
        hints = self._pending.pop((self._step, layer), None)
        if not hints:
            return
        view = self._view
        rows = {rid: i for i, rid in enumerate(view.request_ids)}
        for source, rids, pages in hints:
            if rids is view.request_ids:
                predicted = pages
            else:  # made last step: match rows by request
                predicted = np.zeros_like(read)
                width = min(pages.shape[1], read.shape[1])
                for i, rid in enumerate(rids):
                    if rid in rows:
                        predicted[rows[rid], :width] = pages[i, :width]
            predicted = predicted & view.all_pages
            c = self.counters[source]
            c.predicted += int(predicted.sum())
            c.predicted_read += int((predicted & read).sum())
            c.read += int(read.sum())

    @property
    def buffer(self) -> PrefetchBuffer | None:
        """The PREFETCH tier (None until something was prefetched)."""
        return self._buffer

    @property
    def buffer_used(self) -> int:
        return 0 if self._buffer is None else self._buffer.num_used

    def stats(self) -> dict[str, int | float | str]:
        total = PrefetchCounters()
        for c in self.counters.values():
            total.add(c)
        out: dict[str, int | float | str] = {
            "prefetch_predictor": ",".join(p.name for p in self.predictors) or "none",
            "prefetch_into": "cpu_caches" if self.in_place else "prefetch_tier",
            "prefetch_pages_total": self.num_slots,
            "prefetch_pages_used_now": self.buffer_used,
            "prefetch_bytes_used": self.buffer_used * self.page_bytes,
            "prefetch_pages_promoted": self.pages_promoted,
            "prefetch_bytes_promoted": self.pages_promoted * self.page_bytes,
            "prefetch_late_wait_seconds": self.late_wait_seconds,
            "prefetch_demand_misses": self.demand_misses,
        }
        out.update(_rates("prefetch", total))
        demanded = total.used + self.demand_misses
        out["prefetch_hit_rate"] = total.used / demanded if demanded else 0.0
        if len(self.counters) > 1:
            for name, c in self.counters.items():
                out.update(_rates(f"prefetch_{name}", c))
        return out


def _rates(prefix: str, c: PrefetchCounters) -> dict[str, int | float]:
    out: dict[str, int | float] = {f"{prefix}_{k}": v for k, v in asdict(c).items()}
    out[f"{prefix}_waste"] = c.wasted / c.issued if c.issued else 0.0
    if c.read:  # only where page sets were scored
        out[f"{prefix}_precision"] = c.predicted_read / c.predicted if c.predicted else 0.0
        out[f"{prefix}_recall"] = c.predicted_read / c.read
    return out
