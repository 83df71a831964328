"""Where a decode step's time goes: ms/step, the weight matmuls and the attention kernel
timed around their calls, torch.profiler's top ops, and the physical limits beside them.

    .venv/bin/python benchmarks/profile_decode.py --batch 1 --prompt-len 512
    .venv/bin/python benchmarks/profile_decode.py --batch 32 --weight-quant none

The weight-only matmul and the attention kernel are pybind calls, not aten ops: their
time is reported separately. The limits: weight bytes per step / this machine's read
bandwidth (one pass summing a 1 GiB tensor, all threads), and the FLOP/s of torch's
own float32 GEMM on large square matrices (the practical peak that prefill is held to).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from speckv import LLM, SamplingParams
from speckv.bench.common import machine
from speckv.models import llama


def read_bandwidth() -> float:
    """Bytes/s of one pass reading a 1 GiB float32 tensor (median of 5)."""
    x = torch.ones(1 << 28)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / sorted(times)[2]


def gemm_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * n ** 3 / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--weight-quant", default="auto", help="as the engine option (default: auto)")
    ns = p.parse_args()
    llm = LLM(max_num_seqs=ns.batch, weight_quant=ns.weight_quant)
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    for _ in range(ns.batch):
        prompt = torch.randint(100, 49000, (ns.prompt_len,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=4 * ns.steps + 8,
                                                  ignore_eos=True))
    while engine.scheduler.waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(ns.steps):
        engine.step()
    step_ms = (time.perf_counter() - start) / ns.steps * 1000

    spent = {"matmul": 0.0, "attention": 0.0}

    def timed(kind, fn):
        def call(*args):
            t = time.perf_counter()
            out = fn(*args)
            spent[kind] += time.perf_counter() - t
            return out
        return call

    inner_linear, inner_decode = llama.linear, engine.runner.kernels.decode
    llama.linear = timed("matmul", inner_linear)
    engine.runner.kernels.decode = timed("attention", inner_decode)
    for _ in range(ns.steps):
        engine.step()
    llama.linear, engine.runner.kernels.decode = inner_linear, inner_decode
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(ns.steps):
            engine.step()
    weights = engine.model.weight_bytes
    bandwidth = read_bandwidth()
    print(machine())
    print(f"batch {ns.batch}, context ~{ns.prompt_len}, weight_quant={ns.weight_quant}: "
          f"{step_ms:.1f} ms/step ({ns.batch * 1000 / step_ms:.1f} tok/s)")
    print(f"  weight matmuls {spent['matmul'] / ns.steps * 1000:.1f} ms/step, decode attention "
          f"{spent['attention'] / ns.steps * 1000:.1f} ms/step (timed around the calls)")
    print(f"  weights streamed per step {weights / 1e6:.1f} MB; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> floor {weights / bandwidth * 1000:.1f} ms/step")
    print(f"  float32 GEMM peak here {gemm_flops() / 1e9:.0f} GFLOP/s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
