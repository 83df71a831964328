"""A per-step trace (JSON lines): what each engine step computed, moved and waited for.

The first line is `{"meta": {...}}`: the model's shape, the bytes of weights a step
streams, the KV element and page sizes, the codec and what else shapes a step. Then
one line a step: its wall time, batch, tokens, the KV tokens its decoding sequences
read (`kv_tokens`) and the query-key pairs of its prefill chunks (`prefill_pairs`),
and the change in every cumulative counter of the tiers and the prefetcher during it
(pages and bytes per direction, stall and link-wait seconds, prefetches
issued/used/late/wasted), plus the tiers' occupancy after it. `speckv simulate
--trace` projects it onto other hardware (`speckv.sim`).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speckv.engine.scheduler import SchedulerOutput

_CUMULATIVE = (
    "tier_pages_fetched", "tier_bytes_fetched", "tier_stall_seconds", "tier_pages_stored",
    "tier_encoded_bytes_stored", "tier_evictions", "tier_fetches_skipped",
    "pool_link_wait_seconds", "prefetch_issued", "prefetch_used", "prefetch_late",
    "prefetch_overtaken", "prefetch_wasted", "prefetch_no_room", "prefetch_demand_misses",
    "prefetch_bytes_read", "prefetch_pages_promoted", "prefetch_late_wait_seconds",
    "prefetch_predicted", "prefetch_predicted_read", "prefetch_read",
    "selection_pages_selected", "selection_pages_visible",
)
_LEVELS = ("device_pages_used", "prefetch_pages_used_now", "pool_encoded_bytes",
           "requests_running", "requests_waiting")


class StepTrace:
    """Appends one JSON object per engine step to a file."""

    def __init__(self, path: str, meta: dict[str, Any] | None = None) -> None:
        try:
            self._fh = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot write the trace file {path!r}: {exc}") from exc
        self._start = time.perf_counter()
        self._last: dict[str, Any] = {}
        self._step = 0
        if meta is not None:
            self._fh.write(json.dumps({"meta": meta}) + "\n")

    def write(self, sched: "SchedulerOutput", seconds: float, stats: dict[str, Any]) -> None:
        self._step += 1
        record: dict[str, Any] = {
            "step": self._step,
            "t": round(time.perf_counter() - self._start, 6),
            "seconds": seconds,
            "batch": len(sched.chunks),
            "decode": sum(1 for c in sched.chunks if c.num_tokens == 1),
            "tokens": sum(c.num_tokens for c in sched.chunks),
            # a decode reads its context and itself; a chunk's token j reads start + j + 1
            "kv_tokens": sum(c.start + 1 for c in sched.chunks if c.num_tokens == 1),
            "prefill_pairs": sum(c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) // 2
                                 for c in sched.chunks if c.num_tokens > 1),
        }
        for key in _CUMULATIVE:
            if key in stats:
                record[key] = stats[key] - self._last.get(key, 0)
                self._last[key] = stats[key]
        record.update({k: stats[k] for k in _LEVELS if k in stats})
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()
