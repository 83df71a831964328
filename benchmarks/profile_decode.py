"""Where a decode step's time goes: ms/step, then torch.profiler's top ops.

    .venv/bin/python benchmarks/profile_decode.py --batch 1 --prompt-len 512

The custom CPU attention kernel is a pybind call, not an aten op: its time is
reported separately (timed around the call)."""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from speckv import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    ns = p.parse_args()
    llm = LLM(max_num_seqs=ns.batch)
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    for _ in range(ns.batch):
        prompt = torch.randint(100, 49000, (ns.prompt_len,), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=4 * ns.steps + 8, ignore_eos=True))
    while engine.scheduler.waiting or any(
            s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(ns.steps):
        engine.step()
    step_ms = (time.perf_counter() - start) / ns.steps * 1000

    kernel_s = 0.0
    inner = engine.runner.kernels.decode

    def timed(*args):
        nonlocal kernel_s
        t = time.perf_counter()
        out = inner(*args)
        kernel_s += time.perf_counter() - t
        return out

    engine.runner.kernels.decode = timed
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(ns.steps):
            engine.step()
    engine.runner.kernels.decode = inner
    print(f"batch {ns.batch}, context ~{ns.prompt_len}: {step_ms:.1f} ms/step "
          f"({ns.batch * 1000 / step_ms:.1f} tok/s); decode attention "
          f"{kernel_s / ns.steps * 1000:.1f} ms/step "
          f"(backend: {llm.config.cache.attention_backend})")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
