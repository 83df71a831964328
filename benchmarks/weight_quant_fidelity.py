"""What `--weight-quant int8 / int4` cost in accuracy on a float checkpoint of the real
model, and that `auto` (the GGUF's own Q4_1 blocks) costs nothing.

    .venv/bin/python benchmarks/weight_quant_fidelity.py [--hf-dir DIR]

The float checkpoint is the bundled GGUF exported to an HF directory by transformers
(what `speckv bench throughput --peers vllm` makes; made here if missing): its float32
weights are the Q4_1 values, so int8 / int4 re-quantize them (Q8_0 / Q4_1 at 32 weights
per scale, the 4-bit grid not aligned with the original one). Against the float path
(`none`) on the same weights, per setting: weight bytes, perplexity on the public-domain
bench text (scored in one prefill), mean KL(float || setting) of the next-token
distributions over that text, and free-running greedy agreement on 8 chat prompts x 64
tokens (one early flip counts every later token).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from speckv import LLM, SamplingParams
from speckv.bench.common import bench_text, machine
from speckv.bench.fidelity import PROMPTS
from speckv.bench.throughput import PEERS_DIR, _hf_export


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", help="float HF checkpoint (default: the bundled model exported)")
    p.add_argument("--text-tokens", type=int, default=1024)
    p.add_argument("--json", help="also write the results here")
    ns = p.parse_args()
    hf_dir = Path(ns.hf_dir) if ns.hf_dir else _hf_export(PEERS_DIR, None)
    settings = [("none", str(hf_dir)), ("int8", str(hf_dir)), ("int4", str(hf_dir)),
                ("auto (GGUF Q4_1)", None)]
    rows, reference = [], None
    for name, model in settings:
        llm = LLM(model=model, weight_quant=name.split()[0], device="cpu",
                  device_kv_bytes="256MiB", max_num_seqs=8)
        ids = llm.tokenizer.encode(bench_text())[:ns.text_tokens]
        logits = llm.engine.score(ids)
        logp = torch.log_softmax(logits.double(), -1)
        nll = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
        prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in PROMPTS[:8]]
        outs = [o.token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=64,
                                                                          ignore_eos=True))]
        if reference is None:
            reference = (logp, outs)
        kl = (reference[0].exp() * (reference[0] - logp)).sum(-1).mean().item()
        same = sum(a == b for ra, rb in zip(reference[1], outs) for a, b in zip(ra, rb))
        rows.append({"weight_quant": name, "weight_mb": llm.engine.model.weight_bytes / 1e6,
                     "ppl": math.exp(nll), "kl": kl,
                     "identical": same / sum(len(r) for r in reference[1])})
        llm.engine.close()
    print(f"machine: {machine()}")
    print("| weight_quant | weights MB | ppl | KL vs none | identical greedy tokens |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['weight_quant']} | {r['weight_mb']:.0f} | {r['ppl']:.3f} | {r['kl']:.5f} | "
              f"{r['identical']:.1%} |")
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
