"""A per-step trace (JSON lines): what each engine step computed, moved and waited for.

One line a step: its wall time, batch, tokens, and the change in every cumulative
counter of the tiers and the prefetcher during it (pages and bytes per direction,
stall and link-wait seconds, prefetches issued/used/late/wasted), plus the tiers'
occupancy after it. The input of the hardware projection (`sim`, a later issue).
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

    def __init__(self, path: str) -> None:
        try:
            self._fh = open(path, "w", encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot write the trace file {path!r}: {exc}") from exc
        self._start = time.perf_counter()
        self._last: dict[str, Any] = {}
        self._step = 0

    def write(self, sched: "SchedulerOutput", seconds: float, stats: dict[str, Any]) -> None:
        self._step += 1
        record: dict[str, Any] = {
            "step": self._step,
            "t": round(time.perf_counter() - self._start, 6),
            "seconds": seconds,
            "batch": len(sched.chunks),
            "decode": sum(1 for c in sched.chunks if c.num_tokens == 1),
            "tokens": sum(c.num_tokens for c in sched.chunks),
        }
        for key in _CUMULATIVE:
            if key in stats:
                record[key] = stats[key] - self._last.get(key, 0)
                self._last[key] = stats[key]
        record.update({k: stats[k] for k in _LEVELS if k in stats})
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()
