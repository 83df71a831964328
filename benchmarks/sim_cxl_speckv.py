"""CXL-SpecKV's comparison projected with `speckv.sim` (issue F10): GPU-only vs GPU + a
CXL 2.0 x16 memory pool with compression and speculative prefetch, on A100-80GB and
H100-80GB-SXM, Llama-2-7B and Llama-2-13B (bf16 weights and KV), 4096-token prompts,
256 generated tokens.

    python benchmarks/sim_cxl_speckv.py [--out benchmarks/sim-cxl-speckv.json]

GPU-only: the largest batch whose KV fits beside the weights. With the pool: the GPU
keeps an L1 of KV — 16 GB (the design's 8-16 GB), or all the HBM the weights and a 4 GB
L2 prefetch buffer leave (the pool then only holds the overflow) — and the rest lives
in a 256 GB pool (the design's 64-256 GB) behind cxl2-x16 (64 GB/s, 250 ns); the
batch is the one with the highest throughput the pool allows (a sweep up to the
largest it holds). Per-token latency: GPU-only's batch, with the design's 16 GB L1
(the pool holding the rest of its KV). Every step reads each
sequence's KV (full attention, as CXL-SpecKV does) or the selected part (speckv's
quest). Two parameter sets for the mechanisms:

  paper   compression 3.5x (its "3-4x"), prefetch recall = precision = 0.95 (its "95%
          accuracy"), decoded at line rate (its FPGA), no selection
  speckv  what speckv measured on SmolLM2 (BENCHMARKS.md F2/F3/F4): int8 pages 0.539x
          of fp16, speculative_query precision 0.862 / recall 0.873 (quest, 256
          tokens), quest reading 29.8% of the pages (512 tokens of 2k) with its
          summaries; and the same without selection
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from speckv.pool.link import PROFILES
from speckv.sim import hardware, shapes
from speckv.sim.roofline import Mechanisms, decode_steps, total

CONTEXT, GENERATE = 4096, 256
L1_GB, L2_GB, POOL_GB = 16, 4, 256


def decode_rate(shape, hw, mech, batch):
    steps = decode_steps(batch, CONTEXT, GENERATE)
    t = total(shape, hw, mech, steps).total
    return batch * GENERATE / t, t / GENERATE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    ns = parser.parse_args()
    link = PROFILES["cxl2-x16"]
    rows = []
    for model in ("Llama-2-7B", "Llama-2-13B"):
        shape = shapes.load(model)
        kv_seq = shape.kv_bytes_per_token(2) * (CONTEXT + GENERATE)
        weights = shape.matmul_params * 2
        summary = 2 * shape.kv_heads * shape.head_dim * 2 * shape.layers  # per page, all layers
        sets = {
            "paper": dict(codec_ratio=1 / 3.5, prefetch_recall=0.95, prefetch_precision=0.95),
            "speckv, full attention": dict(codec_ratio=0.539, prefetch_recall=0.873,
                                           prefetch_precision=0.862),
            "speckv, quest 29.8%": dict(codec_ratio=0.539, prefetch_recall=0.873,
                                        prefetch_precision=0.862, selection_fraction=0.298,
                                        summary_bytes_per_page=summary),
        }
        for name in ("a100-80gb", "h100-80gb-sxm"):
            hw = hardware.load(name)
            base = Mechanisms(weight_bytes=weights)
            gpu_batch = int((hw.memory_gb * 1e9 - weights) // kv_seq)
            gpu_rate, gpu_step = decode_rate(shape, hw, base, gpu_batch)
            for (label, params), l1 in [(x, l1) for l1 in ("16 GB", "all free HBM")
                                        for x in sets.items()]:
                l1_bytes = L1_GB * 1e9 if l1 == "16 GB" else hw.memory_gb * 1e9 - weights \
                    - L2_GB * 1e9
                mech = replace(base, link=link, **params)
                batch = int(POOL_GB * 1e9 // (kv_seq * mech.codec_ratio))
                batch = min(batch, 4096)
                pooled = max(0.0, 1 - l1_bytes / (batch * kv_seq))
                at_pool = replace(mech, pooled_fraction=pooled)
                rate, step = decode_rate(shape, hw, at_pool, batch)
                # the best batch the pool allows (a smaller one may move less per step)
                best = max(((decode_rate(shape, hw, replace(mech, pooled_fraction=max(
                    0.0, 1 - l1_bytes / (b * kv_seq))), b)[0], b)
                    for b in sorted({*range(1, 129), *(max(1, batch * k // 32)
                                                       for k in range(1, 33))})))
                # per-token latency at GPU-only's batch, the pool holding what L1 cannot
                same = replace(mech, pooled_fraction=max(0.0, 1 - L1_GB * 1e9 / (gpu_batch * kv_seq)))
                # (latency: the design's 16 GB L1, so the pool holds part of GPU-only's batch)
                _, same_step = decode_rate(shape, hw, same, gpu_batch)
                rows.append({"model": model, "gpu": hw.name, "params": label, "l1": l1,
                             "gpu_only_batch": gpu_batch, "gpu_only_tok_s": gpu_rate,
                             "pool_batch": batch, "pool_tok_s": rate,
                             "best_pool_batch": best[1], "best_pool_tok_s": best[0],
                             "throughput_ratio": best[0] / gpu_rate,
                             "latency_overhead_same_batch": same_step / gpu_step - 1})
    print(f"{'model':<12} {'GPU':<14} {'L1':<13} {'mechanisms':<24} {'GPU-only':>16} "
          f"{'+CXL pool, best':>20} {'ratio':>6} {'latency +':>9}")
    for r in rows:
        print(f"{r['model']:<12} {r['gpu']:<14} {r['l1']:<13} {r['params']:<24} "
              f"{r['gpu_only_batch']:>4} x {r['gpu_only_tok_s']:8.0f}   "
              f"{r['best_pool_batch']:>5} x {r['best_pool_tok_s']:9.0f} {r['throughput_ratio']:6.2f}x "
              f"{100 * r['latency_overhead_same_batch']:8.1f}%")
    if ns.out:
        Path(ns.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
