"""Shared pieces of the benchmarks that time decode steps on sequences prefilled once."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def make_engine(loaded, options: dict, **extra):
    from speckv import LLM

    return LLM(loaded=loaded, **{"max_num_batched_tokens": 8192, **options, **extra})


def prefill(llm, batch: int, context: int, decode_steps: int) -> None:
    """Submits `batch` random prompts of `context` tokens; steps until all decode."""
    from speckv import SamplingParams

    engine = llm.engine
    g = torch.Generator().manual_seed(7)
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 16, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(100, 49000, (context,), generator=g).tolist(), params)
    while True:
        outs = engine.step()
        if len(outs) == batch and all(o.num_generated_tokens >= 1 for o in outs):
            return
        if any(o.finished for o in outs) or not engine.has_unfinished():
            admitted = engine.cache.num_sequences()
            raise ValueError(f"only {admitted} of {batch} sequences of {context} tokens fit in "
                             "the DEVICE tier at once: give it more room (a larger budget or "
                             "fraction), or a smaller batch")


def time_steps(llm, steps: int) -> dict[str, Any]:
    """Runs one warm-up step then `steps` timed steps; deltas of the counters."""
    engine = llm.engine
    engine.step()
    before = llm.stats()
    times, tokens = [], 0
    for _ in range(steps):
        t0 = time.perf_counter()
        tokens += len(engine.step())
        times.append(time.perf_counter() - t0)
    after = llm.stats()

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    used, missed, issued = delta("prefetch_used"), delta("prefetch_demand_misses"), delta("prefetch_issued")
    total = sum(times)
    return {"step_ms": 1000 * statistics.median(times), "seconds": total,
            "tok_s": tokens / total,
            "stall_fraction": delta("tier_stall_seconds") / total,
            # promoted: prefetched pages handed to DEVICE (in place, hinted rows are
            # among those read in place)
            "pages_from_pool_per_step": (delta("tier_pages_fetched")
                                         + delta("prefetch_pages_promoted")
                                         + delta("tier_pages_read_in_place")) / steps,
            "hit_rate": used / (used + missed) if used + missed else 0.0,
            "waste": delta("prefetch_wasted") / issued if issued else 0.0,
            "late": delta("prefetch_late"), "overtaken": delta("prefetch_overtaken"),
            "issued": issued,
            "link_wait_s": delta("pool_link_wait_seconds")}


def working_set_bytes(loaded, batch: int, context: int, steps: int) -> int:
    """KV bytes (float32) of `batch` sequences of `context` + `steps` tokens, in whole pages."""
    pages = -(-(context + steps) // 16)
    return batch * pages * 16 * loaded.args.kv_bytes_per_token(4)
