"""Prefetching in place: hinted pool rows brought into the CPU's caches, not copied.

When attention reads pooled pages where they lie (`kv_read` in place), there is no
PREFETCH tier to fill: the prefetcher's hints become software prefetches of the
hinted rows (`TieredStore.prefetch_in_place`), issued a layer or a step before the
kernel reads them. This set remembers which rows were hinted, by whom and when, so
that the accounting stays exact:

    issued   hinted rows prefetched (a row hinted again before it is read is not
             issued twice)
    used     hinted rows that attention then read
    wasted   hinted rows not read by the end of the step after their hint, or whose
             page was freed first
    late     always 0: a prefetch instruction has nothing in flight to wait for (whether
             its lines were still cached when the kernel came is not observable here;
             the step time is what shows it)

Like the PREFETCH tier, the state is arrays indexed by pool key.
"""

from __future__ import annotations

import numpy as np


class WarmSet:
    """Pool rows hinted in place and not read yet, with their predictor and step."""

    def __init__(self, num_keys: int) -> None:
        """`num_keys`: the pool's slot count (pool keys are below it)."""
        self._source = np.full(num_keys, -1, dtype=np.int64)  # -1: not hinted
        self._step = np.zeros(num_keys, dtype=np.int64)

    def issue(self, keys: np.ndarray, source: int, step: int) -> np.ndarray:
        """Marks `keys` hinted by `source` in `step`; returns those not hinted already
        (the ones to prefetch)."""
        keys = np.unique(keys)
        new = keys[self._source[keys] < 0]
        self._source[new] = source
        self._step[new] = step
        return new

    def consume(self, keys: np.ndarray) -> np.ndarray:
        """Attention read `keys`: returns the sources of those that were hinted (used)
        and forgets them."""
        keys = np.asarray(keys, dtype=np.int64)
        hit = keys[self._source[keys] >= 0]
        return self._take(np.unique(hit))

    def expire(self, step: int) -> np.ndarray:
        """Forgets rows hinted before `step` and never read; returns their sources (wasted)."""
        stale = np.flatnonzero((self._source >= 0) & (self._step < step))
        return self._take(stale)

    def forget(self, keys: np.ndarray) -> np.ndarray:
        """`keys` were freed: returns the sources of those hinted (wasted)."""
        keys = np.asarray(keys, dtype=np.int64)
        return self._take(keys[self._source[keys] >= 0])

    def clear(self) -> np.ndarray:
        """Forgets every hinted row; returns their sources (wasted)."""
        return self._take(np.flatnonzero(self._source >= 0))

    def _take(self, keys: np.ndarray) -> np.ndarray:
        sources = self._source[keys]
        self._source[keys] = -1
        return sources
