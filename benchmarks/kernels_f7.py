"""Decode attention kernels timed alone on synthetic pages (BENCHMARKS.md F7).

    .venv/bin/python benchmarks/kernels_f7.py

Dense, sparse (a precomputed selection of 1/8 of the pages) and fused quest (scoring,
top-k and the same sparse attention in one call), float32 DEVICE pages scattered over
a 4,200-page pool, SmolLM2-135M's attention shape (9 query heads, 3 KV heads, 64 dims).
Median of 15 calls after 3 warm-ups.
"""

from __future__ import annotations

import time

import torch

from speckv.kv.attention import NO_ROWS
from speckv.kv.cpu_kernels import load_cpu_kernels


def median_ms(fn) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    k = load_cpu_kernels()
    torch.manual_seed(0)
    n, ps, hkv, dim, heads = 4200, 16, 3, 64, 9
    kp, vp = torch.randn(n, ps, hkv, dim), torch.randn(n, ps, hkv, dim)
    summaries = torch.stack(torch.aminmax(kp, dim=1), dim=2).contiguous()
    for batch, pages in [(1, 128), (1, 512), (8, 512), (32, 64)]:
        table = torch.randint(0, n, (batch, pages))
        slots = torch.randint(0, n, (batch, pages))
        lens = torch.full((batch,), pages * ps - 3)
        q = torch.randn(batch, heads, dim)
        chosen = max(1, pages // 8)
        heads_table = table[:, None, :chosen].expand(batch, hkv, chosen).contiguous()
        chosen_lens = torch.full((batch,), chosen * ps - 3)
        dense = median_ms(lambda: k.paged_decode_attention(q, kp, vp, table, lens, 0.125,
                                                           NO_ROWS, 0))
        sparse = median_ms(lambda: k.sparse_decode_attention(q, kp, vp, heads_table,
                                                             chosen_lens, 0.125, NO_ROWS, 0))
        fused = median_ms(lambda: k.quest_decode_attention(
            q, kp, vp, summaries, slots, table, lens, torch.full((batch,), chosen), True, 0.125,
            NO_ROWS, 0))
        print(f"batch {batch:2d}, {pages:3d} pages: dense {dense:.3f} ms, sparse 1/8 "
              f"{sparse:.3f} ms, fused quest 1/8 {fused:.3f} ms")


if __name__ == "__main__":
    main()
