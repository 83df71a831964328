"""Decode attention kernels timed alone on synthetic pages (BENCHMARKS.md F7).

    .venv/bin/python benchmarks/kernels_f7.py                  # this build, cache-resident
    .venv/bin/python benchmarks/kernels_f7.py --kv-bound \\
        --sources speckv/kv/csrc /tmp/old/speckv/kv/csrc       # builds side by side

Default: dense, sparse (a precomputed selection of 1/8 of the pages) and fused quest
(scoring, top-k and the same sparse attention in one call), float32 DEVICE pages
scattered over a 4,200-page pool (it fits in a large L3), SmolLM2-135M's attention
shape (9 query heads, 3 KV heads, 64 dims). Median of 15 calls after 3 warm-ups.

`--kv-bound`: what a decode step's attention does at 8 x 4,096 tokens: 30 layers'
tables over 61,440 distinct pages (1.5 GB of float32 K and V, far past any cache),
one call per layer, timed as a step (median of 7). Per build: float32 DEVICE pages,
the same pages as int8 pool rows read in place (identical decoded values: the two
outputs must match exactly), dense vs fused quest at 1/8 on 8 x 8,192 tokens, and
dense on 32 x 576 tokens (F1's batch 32; median of 9).
`--hint-sweep`: what in-place predictor hints cost (each next layer's rows
software-prefetched before a layer's kernel, as layer_ahead's hints do; median of 7).
`--sources` compiles each kernel source directory given (e.g. an older checkout's) as
a module of its own and times them interleaved, so that machine drift hits all alike.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from speckv.codecs.base import CODECS, PageShape
from speckv.kv.attention import NO_ROWS
from speckv.kv.cpu_kernels import _CFLAGS, _LDFLAGS, _SOURCES, load_cpu_kernels

HKV, DIM, HEADS, PS, LAYERS = 3, 64, 9, 16, 30


def median_ms(fn, warmup: int = 3, repeats: int = 15) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def cache_resident() -> None:
    k = load_cpu_kernels()
    torch.manual_seed(0)
    n = 4200
    kp, vp = torch.randn(n, PS, HKV, DIM), torch.randn(n, PS, HKV, DIM)
    summaries = torch.stack(torch.aminmax(kp, dim=1), dim=2).contiguous()
    for batch, pages in [(1, 128), (1, 512), (8, 512), (32, 64)]:
        table = torch.randint(0, n, (batch, pages))
        slots = torch.randint(0, n, (batch, pages))
        lens = torch.full((batch,), pages * PS - 3)
        q = torch.randn(batch, HEADS, DIM)
        chosen = max(1, pages // 8)
        heads_table = table[:, None, :chosen].expand(batch, HKV, chosen).contiguous()
        chosen_lens = torch.full((batch,), chosen * PS - 3)
        dense = median_ms(lambda: k.paged_decode_attention(q, kp, vp, table, lens, 0.125,
                                                           NO_ROWS, 0, 0))
        sparse = median_ms(lambda: k.sparse_decode_attention(q, kp, vp, heads_table,
                                                             chosen_lens, 0.125, NO_ROWS, 0))
        fused = median_ms(lambda: k.quest_decode_attention(
            q, kp, vp, summaries, slots, table, lens, torch.full((batch,), chosen), True, 0.125,
            NO_ROWS, 0))
        print(f"batch {batch:2d}, {pages:3d} pages: dense {dense:.3f} ms, sparse 1/8 "
              f"{sparse:.3f} ms, fused quest 1/8 {fused:.3f} ms")


def build(source: Path):
    """The kernels of one source directory, compiled as a module of their own."""
    from torch.utils.cpp_extension import load

    name = "kbench_" + hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:10]
    directory = Path.home() / ".cache" / "speckv" / "kernel-bench" / name
    directory.mkdir(parents=True, exist_ok=True)
    # the attention sources from `source`; the rest of the module (the weight and
    # layer kernels its bindings name) from this tree
    sources = [str(source / p.name) if p.parent.name == "csrc" and p.parent.parent.name == "kv"
               else str(p) for p in _SOURCES]
    return load(name=name, sources=sources,
                extra_cflags=list(_CFLAGS), extra_ldflags=list(_LDFLAGS),
                build_directory=str(directory), verbose=False)


def time_interleaved(builds: dict, fns: dict, rounds: int,
                     results: dict[str, dict[str, list[float]]]) -> None:
    """`rounds` rounds of every build running every fn once (so drift hits all alike);
    appends each call's seconds to results[build][label]."""
    for _ in range(rounds):
        for name, k in builds.items():
            for label, fn in fns.items():
                started = time.perf_counter()
                fn(k)
                results[name].setdefault(label, []).append(time.perf_counter() - started)


def kv_bound(sources: list[Path]) -> None:
    builds = {str(s): build(s) for s in sources} if sources else \
        {"this build": load_cpu_kernels()}
    torch.manual_seed(0)

    def pages(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(n, PS, HKV, DIM), torch.randn(n, PS, HKV, DIM)

    def layer_tables(batch: int, num_pages: int) -> list[torch.Tensor]:
        perm = torch.randperm(batch * num_pages * LAYERS)
        size = batch * num_pages
        return [perm[i * size:(i + 1) * size].view(batch, num_pages).contiguous()
                for i in range(LAYERS)]

    # 8 x 4,096: float32 pages vs the same values as int8 rows
    batch, num_pages = 8, 256
    n = batch * num_pages * LAYERS
    codec = CODECS.get("int8")(PageShape(PS, HKV, DIM, torch.float32))
    kp, vp = pages(n)
    rows = torch.cat([codec.encode(kp[i:i + 4096], vp[i:i + 4096]).data
                      for i in range(0, n, 4096)])
    for i in range(0, n, 4096):  # DEVICE holds exactly what a row decodes to
        kp[i:i + 4096], vp[i:i + 4096] = codec.decode(rows[i:i + 4096])
    tables = layer_tables(batch, num_pages)
    lens = torch.full((batch,), num_pages * PS - 3)
    q = torch.randn(batch, HEADS, DIM)
    fmt = 1  # cpu_kernels.FORMATS["int8"]

    def dense_f32(k):
        return [k.paged_decode_attention(q, kp, vp, t, lens, 0.125, NO_ROWS, 0, 0) for t in tables]

    def dense_int8(k):
        return [k.paged_decode_attention(q, kp, vp, -1 - t, lens, 0.125, rows, fmt, 0)
                for t in tables]

    results: dict[str, dict[str, list[float]]] = {name: {} for name in builds}
    for name, k in builds.items():
        same = all(torch.equal(a, b) for a, b in zip(dense_f32(k), dense_int8(k)))
        print(f"{name}: int8 rows read in place == the same values in DEVICE: {same}")
    time_interleaved(builds, {"f32": dense_f32, "int8": dense_int8}, 7, results)
    kp = vp = rows = None  # free 1.9 GB before the next shape

    # 8 x 8,192: dense vs fused quest at 1/8, float32 DEVICE pages
    num_pages = 512
    n = batch * num_pages * LAYERS
    kp, vp = pages(n)
    tables = layer_tables(batch, num_pages)
    summaries = torch.empty(n, HKV, 2, DIM)
    summary_tables = []
    for i, t in enumerate(tables):  # summary slots in allocation order, as the cache does
        ids = torch.arange(i * batch * num_pages, (i + 1) * batch * num_pages)
        summaries[ids] = torch.stack(torch.aminmax(kp[t.reshape(-1)], dim=1), dim=2)
        summary_tables.append(ids.view(batch, num_pages))
    lens = torch.full((batch,), num_pages * PS - 3)
    budget = torch.full((batch,), num_pages // 8)

    def dense_8k(k):
        for t in tables:
            k.paged_decode_attention(q, kp, vp, t, lens, 0.125, NO_ROWS, 0, 0)

    def quest_8k(k):
        for t, s in zip(tables, summary_tables):
            k.quest_decode_attention(q, kp, vp, summaries, s, t, lens, budget, True, 0.125,
                                     NO_ROWS, 0)

    time_interleaved(builds, {"dense 8k": dense_8k, "quest 8k": quest_8k}, 5, results)
    kp = vp = summaries = None

    # 32 x 576: many short sequences, float32 DEVICE pages (F1's batch 32)
    batch, num_pages = 32, 36
    kp, vp = pages(batch * num_pages * LAYERS)
    tables = layer_tables(batch, num_pages)
    lens = torch.full((batch,), num_pages * PS - 3)
    q32 = torch.randn(batch, HEADS, DIM)

    def dense_32(k):
        for t in tables:
            k.paged_decode_attention(q32, kp, vp, t, lens, 0.125, NO_ROWS, 0, 0)

    time_interleaved(builds, {"dense 32": dense_32}, 9, results)
    print("| build | 8 x 4k float32 DEVICE | 8 x 4k int8 rows | f32 / int8 | 8 x 8k dense | "
          "8 x 8k fused quest 1/8 | dense / quest | 32 x 576 dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        ms = {label: 1000 * sorted(t)[len(t) // 2] for label, t in r.items()}
        print(f"| {name} | {ms['f32']:.1f} ms | {ms['int8']:.1f} ms | "
              f"{ms['f32'] / ms['int8']:.2f}x | {ms['dense 8k']:.1f} ms | "
              f"{ms['quest 8k']:.1f} ms | {ms['dense 8k'] / ms['quest 8k']:.2f}x | "
              f"{ms['dense 32']:.1f} ms |")


def hint_sweep() -> None:
    """What in-place predictor hints cost: int8 rows at 8 x 4,096 tokens, 30 layers, each
    layer's kernel alone, after software-prefetching the next layer's rows (what
    layer_ahead's hints do), after prefetching its own rows, and the sweeps alone."""
    k = load_cpu_kernels()
    torch.manual_seed(0)
    batch, num_pages = 8, 256
    n = batch * num_pages * LAYERS
    codec = CODECS.get("int8")(PageShape(PS, HKV, DIM, torch.float32))
    rows = torch.cat([codec.encode(torch.randn(4096, PS, HKV, DIM),
                                   torch.randn(4096, PS, HKV, DIM)).data
                      for _ in range(0, n, 4096)])[:n].contiguous()
    empty = torch.empty(1, PS, HKV, DIM)  # no DEVICE pages: every entry is a pool row
    perm = torch.randperm(n)
    size = batch * num_pages
    tables = [perm[i * size:(i + 1) * size].view(batch, num_pages).contiguous()
              for i in range(LAYERS)]
    lens = torch.full((batch,), num_pages * PS - 3)
    q = torch.randn(batch, HEADS, DIM)

    def attend(t):
        k.paged_decode_attention(q, empty, empty, -1 - t, lens, 0.125, rows, 1, 0)

    def plain(_):
        for t in tables:
            attend(t)

    def next_layer(_):
        k.prefetch_rows(rows, tables[0].reshape(-1))
        for i, t in enumerate(tables):
            if i + 1 < LAYERS:
                k.prefetch_rows(rows, tables[i + 1].reshape(-1))
            attend(t)

    def own_layer(_):
        for t in tables:
            k.prefetch_rows(rows, t.reshape(-1))
            attend(t)

    def sweeps(_):
        for t in tables:
            k.prefetch_rows(rows, t.reshape(-1))

    results: dict[str, dict[str, list[float]]] = {"int8": {}}
    time_interleaved({"int8": k}, {"kernel alone": plain, "next layer's rows first": next_layer,
                                   "its own rows first": own_layer, "the sweeps alone": sweeps},
                     7, results)
    for label, t in results["int8"].items():
        print(f"| {label} | {1000 * sorted(t)[len(t) // 2]:.1f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-bound", action="store_true",
                        help="30 layers' tables past any cache, a step's worth per timing")
    parser.add_argument("--sources", nargs="*", type=Path, default=[],
                        help="kernel source directories to build and compare (--kv-bound)")
    parser.add_argument("--hint-sweep", action="store_true",
                        help="what software-prefetching a layer's rows ahead of its kernel "
                             "costs (in-place predictor hints)")
    args = parser.parse_args()
    if args.hint_sweep:
        hint_sweep()
    elif args.kv_bound:
        kv_bound(args.sources)
    else:
        cache_resident()


if __name__ == "__main__":
    main()
