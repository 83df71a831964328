"""The transfer worker: a background thread that reads prefetched pages from the pool
and decodes them into the PREFETCH tier while the model computes.

On CPU it is a thread (the pool read, the link model's wait and the decode kernels
release the GIL). On CUDA the same interface would hold a copy stream and pinned
staging buffers; `TieredStore.read_into` already stages through pinned memory there.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch

from speckv.kv.tiers import TieredStore
from speckv.prefetch.buffer import PrefetchBuffer, Transfer

logger = logging.getLogger(__name__)


class TransferWorker:
    """Runs prefetch transfers in submission order on one thread."""

    def __init__(self, store: TieredStore, buffer: PrefetchBuffer,
                 on_done: Callable[[Transfer, int, int, bool], None]) -> None:
        """`on_done(transfer, pages_read, bytes_read, ok)` is called on the worker after
        each transfer."""
        self._threads = torch.get_num_threads()
        self.store = store
        self.buffer = buffer
        self.on_done = on_done
        self._jobs: queue.Queue[Transfer | None] = queue.Queue()
        self._staging: dict[str, torch.Tensor] = {}  # the worker's own buffers
        self._running = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="speckv-prefetch", daemon=True)
        self._thread.start()

    def submit(self, transfer: Transfer | None) -> None:
        if transfer is not None:
            self._jobs.put(transfer)

    def drain(self) -> None:
        """Waits until every submitted transfer has completed."""
        self._jobs.join()

    def pause(self) -> None:
        """Holds transfers not yet started (they stay in flight; a step that demands one
        overtakes it) until `resume`: for scripted scenarios (cancels in flight)."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        self.resume()
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        # as many threads as the model's: a copy on one thread takes twice as long and
        # becomes the step's critical path (measured, BENCHMARKS.md F4)
        torch.set_num_threads(self._threads)
        while True:
            transfer = self._jobs.get()
            self._running.wait()
            try:
                if transfer is None:
                    return
                self._transfer(transfer)
            finally:
                self._jobs.task_done()

    def _transfer(self, t: Transfer) -> None:
        keys, slots = self.buffer.begin(t)
        ok, nbytes = True, 0
        if keys.size:
            try:
                nbytes = self.store.read_into(keys.tolist(), self.buffer.pages, slots,
                                              self._staging)
            except Exception:  # noqa: BLE001 — a failed prefetch is a miss, never an error
                if self.buffer.still_wanted(t, keys):  # a freed key is expected to fail
                    logger.warning("prefetch of %d pages failed", keys.size, exc_info=True)
                ok = False
        self.buffer.complete(t, ok)
        self.on_done(t, int(keys.size), nbytes, ok)
