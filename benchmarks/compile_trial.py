"""Does torch.compile pay for the dense part of a decoder layer? (issue 14's trial)

The dense block of every layer -- residual add, RMSNorm, the fused gate/up projection,
silu(gate) * up, the down projection -- timed over all 30 layers of the bundled model
three ways, side by side in one process:

    eager     torch ops, as `LlamaModel.forward` runs them off the CPU fast path
    compiled  the same function through torch.compile (Inductor, default mode)
    speckv    what the engine runs on the CPU: the fused C++ ops and `quant.linear`

with the weights dequantized to float32 (`--weight-quant none`; Inductor cannot see
into speckv's quantized kernel, a pybind call) and, for speckv only, also as the
GGUF keeps them (`auto`). Attention is left out (F3 measured compile slower there).

    .venv/bin/python benchmarks/compile_trial.py --tokens 1,8,32,512
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from speckv import LLM
from speckv.models.quant import linear


def block(x, delta, norm, w_gate_up, w_down, eps: float):
    """Residual add, RMSNorm, SwiGLU MLP: one layer's dense MLP half, in torch ops."""
    x = x + delta
    h = F.rms_norm(x, norm.shape, norm, eps)
    gate, up = (h @ w_gate_up).chunk(2, dim=-1)
    return x, (F.silu(gate) * up) @ w_down


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,8,32,512", help="token counts T (default: 1,8,32,512)")
    p.add_argument("--repeats", type=int, default=7, help="timed passes over the 30 layers")
    p.add_argument("--json", help="write the results here")
    ns = p.parse_args()
    float_model = LLM(weight_quant="none", max_num_seqs=1).engine.model
    quant_model = LLM(weight_quant="auto", max_num_seqs=1).engine.model
    eps = float_model.args.rms_norm_eps
    ops = float_model._ops
    compiled = torch.compile(block, dynamic=False)

    def eager_pass(model, x, delta, fn):
        for w in model.layers:
            x, delta = fn(x, delta, w.mlp_norm, w.w_gate_up, w.w_down, eps)
        return x

    def speckv_pass(model, x, delta):
        for w in model.layers:
            h = ops.add_rms_norm_(x, delta, w.mlp_norm, eps)
            delta = linear(ops.silu_mul(linear(h, w.w_gate_up)), w.w_down)
        return x

    results = []
    for T in map(int, ns.tokens.split(",")):
        g = torch.Generator().manual_seed(T)
        x0 = torch.randn(T, float_model.args.hidden_size, generator=g)
        d0 = torch.randn_like(x0) * 0.1
        started = time.perf_counter()
        compiled_out = eager_pass(float_model, x0.clone(), d0, compiled)  # compiles here
        compile_s = time.perf_counter() - started
        eager_out = eager_pass(float_model, x0.clone(), d0, block)
        fused_out = speckv_pass(float_model, x0.clone(), d0.clone())
        for name, out in (("compiled", compiled_out), ("speckv", fused_out)):
            err = ((out - eager_out).abs().max() / eager_out.abs().max()).item()
            assert err < 1e-4, f"{name} differs from eager: {err:.2e} of the largest value"
        runs = {
            "eager": lambda: eager_pass(float_model, x0.clone(), d0, block),
            "compiled": lambda: eager_pass(float_model, x0.clone(), d0, compiled),
            "speckv[none]": lambda: speckv_pass(float_model, x0.clone(), d0.clone()),
            "speckv[auto]": lambda: speckv_pass(quant_model, x0.clone(), d0.clone()),
        }
        times = {name: [] for name in runs}
        for _ in range(ns.repeats):  # interleaved: the machine's noise hits all alike
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - started) * 1000)
        row = {"tokens": T, "compile_s": round(compile_s, 1)}
        row.update({name: round(sorted(t)[len(t) // 2], 3) for name, t in times.items()})
        results.append(row)
        print(f"T={T}: " + ", ".join(f"{name} {row[name]:.2f} ms" for name in runs)
              + f" (median of {ns.repeats}, 30 layers; compile {compile_s:.0f} s)", flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
