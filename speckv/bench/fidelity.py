"""`speckv bench fidelity`: what each pool codec costs in accuracy, on the bundled model.

Every codec runs in the same process on the same weights against the all-resident
reference (no pool), with pages stored as they seal. A stored page's resident
copy is replaced by its decoded form (see `speckv.kv.tiers`), so every page but
the open one is read through the codec, exactly as if it came back from the pool.
Per codec:

  bytes/page, ratio      exact encoded size of the pages stored, vs FP16 (12,288 B)
  attn rel err           ||o' - o|| / ||o|| of attention outputs, every layer, the last
                         256 queries of a 1,024-token text, all of its pages encoded
  KL                     mean KL(reference || codec) of next-token distributions over
                         the text, scored in page-sized chunks (decode-like reads)
  ppl                    perplexity on the text (public domain, speckv/bench/data)
  agreement (forced)     top-1 agreement with the reference's greedy tokens, teacher
                         forced: 16 prompts x 128 tokens, each position given the
                         reference's prefix (decisions, not cascades)
  identical (free)       free-running greedy: fraction of the 16 x 128 tokens equal to
                         the reference at the same position (one early flip counts
                         every later token as different)
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F

from speckv.bench.common import bench_text, publish

DEFAULT_CODECS = "none,fp16,bf16,int8,kivi4,kivi2,seed,int8+zstd"
PROMPTS = [
    "Explain why the sky is blue.", "Write a haiku about autumn leaves.",
    "What is the capital of Australia and why was it chosen?",
    "Give three tips for learning a new language.", "Describe how a bicycle works.",
    "Summarize the plot of Romeo and Juliet.", "What are prime numbers? Give examples.",
    "Write a short story about a robot who learns to paint.",
    "How do plants make food from sunlight?", "List the planets of the solar system.",
    "What should I pack for a weekend hiking trip?", "Explain what a neural network is.",
    "Why do cats purr?", "Write a polite email asking for a meeting next week.",
    "What causes the seasons on Earth?", "Describe the taste of a lemon to someone who never had one.",
]


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("fidelity", help="accuracy cost of each pool codec vs the reference",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codecs", default=DEFAULT_CODECS,
                   help=f"comma-separated codecs (default: {DEFAULT_CODECS})")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per prompt (default: 128)")
    p.add_argument("--num-prompts", type=int, default=16, help=f"prompts, at most {len(PROMPTS)} (default: 16)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="score only the first N tokens of the benchmark text (default: all of "
                        "it; fewer make a quick check)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


class CaptureAttention:
    """A `LayerAttention` for one sequence without a cache: causal SDPA, keeping q, k, v."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, layer, q, k, v):
        self.layers.append((q.clone(), k.clone(), v.clone()))
        return attend(q, k, v)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """Causal GQA attention of q [T, H, D] over k, v [T, Hkv, D] (only the last queries)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[0]
    first = 0 if last is None else t - last
    mask = torch.ones(t, t, dtype=torch.bool).tril()[first:]
    out = F.scaled_dot_product_attention(q[first:].transpose(0, 1), k.transpose(0, 1),
                                         v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


def _int8_keys_per_token():
    from speckv.codecs.quant import Int8Codec

    class Int8KeysPerToken(Int8Codec):
        """The int8 alternative measured against: keys scaled per token and head."""

        key_dim = 3

        def __init__(self, shape):
            super().__init__(shape)
            self._k_scale = self._v_scale

    return Int8KeysPerToken


def attention_errors(model, tokens: list[int], codecs: list[str], page_size: int) -> dict[str, float]:
    """Mean over layers of the attention-output relative error with every page encoded."""
    from speckv.codecs import PageShape, make_codec

    Int8KeysPerToken = _int8_keys_per_token()
    capture = CaptureAttention()
    ids = torch.tensor(tokens, device=model.device)
    with torch.inference_mode():
        model.forward(ids, torch.arange(len(tokens), device=model.device), capture)
    errors = {}
    for name in codecs:
        total = 0.0
        for q, k, v in capture.layers:
            t, hkv, d = k.shape
            shape = PageShape(page_size, hkv, d, k.dtype)
            codec = Int8KeysPerToken(shape) if name == "int8-keys-per-token" else make_codec(name, shape)
            kp, vp = k.view(-1, page_size, hkv, d), v.view(-1, page_size, hkv, d)
            k2, v2 = codec.decode(codec.encode(kp, vp).data)
            ref = attend(q, k, v, last=256)
            got = attend(q, k2.reshape(t, hkv, d), v2.reshape(t, hkv, d), last=256)
            total += float((got - ref).norm() / ref.norm())
        errors[name] = total / len(capture.layers)
    return errors


def _greedy(n: int):
    from speckv import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def evaluate(llm, reference: dict[str, Any], prompts: list[list[int]], text: list[int],
             new_tokens: int) -> dict[str, Any]:
    """Scores one engine against the reference's logits and greedy continuations."""
    engine = llm.engine
    ps = engine.cache.page_size
    logits = engine.score(text, chunk_size=ps)
    logp = torch.log_softmax(logits[:-1], -1)
    ref_logp = reference["logp"]
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    nll = float(F.nll_loss(logp, torch.tensor(text[1:])))
    forced = total = 0
    for prompt, cont in zip(prompts, reference["continuations"]):
        scores = engine.score(prompt + cont, chunk_size=ps)
        picked = scores[len(prompt) - 1:-1].argmax(-1).tolist()
        forced += sum(a == b for a, b in zip(picked, cont))
        total += len(cont)
    outs = llm.generate(prompts, _greedy(new_tokens), use_tqdm=False)
    same = sum(a == b for o, ref in zip(outs, reference["continuations"])
               for a, b in zip(o.token_ids, ref))
    return {"kl": kl, "ppl": math.exp(nll), "agreement_forced": forced / total,
            "identical_free": same / total,
            "identical_sequences": sum(o.token_ids == r for o, r in
                                       zip(outs, reference["continuations"]))}


def run(ns: argparse.Namespace, options: dict) -> int:
    from tqdm.auto import tqdm

    from speckv import LLM
    from speckv.codecs.base import validate_codec_name
    from speckv.config import EngineConfig
    from speckv.models.loaded import load_model

    codecs = [c.strip() for c in ns.codecs.split(",") if c.strip()]
    for c in codecs:
        validate_codec_name(c)
    if not 1 <= ns.num_prompts <= len(PROMPTS) or ns.new_tokens < 1:
        raise ValueError(f"--num-prompts must be in [1, {len(PROMPTS)}] and --new-tokens >= 1")
    if ns.text_tokens is not None and ns.text_tokens < 32:
        raise ValueError(f"--text-tokens must be >= 32, got {ns.text_tokens}")
    options = {"device_kv_bytes": "512MiB", **options}
    config = EngineConfig.from_kwargs(**options)
    loaded = load_model(config.model)
    ref = LLM(loaded=loaded, **options)
    tok = ref.tokenizer
    text = tok.encode(bench_text())[:ns.text_tokens]
    prompts = [tok.encode(ref.apply_chat_template([{"role": "user", "content": p}]))
               for p in PROMPTS[:ns.num_prompts]]
    ps = ref.engine.cache.page_size
    logits = ref.engine.score(text, chunk_size=ps)
    reference = {"logp": torch.log_softmax(logits[:-1], -1),
                 "continuations": [o.token_ids for o in ref.generate(prompts, _greedy(ns.new_tokens), use_tqdm=False)]}
    ref_ppl = math.exp(float(F.nll_loss(reference["logp"], torch.tensor(text[1:]))))
    att = attention_errors(loaded.model, text[:1024], codecs + ["int8-keys-per-token"]
                           if "int8" in codecs else codecs, ps)
    rows = []
    for name in tqdm(codecs, desc="codecs", file=sys.stderr):
        llm = LLM(loaded=loaded, pool="local", codec=name, pool_bytes="2GiB", **options)
        try:
            r = evaluate(llm, reference, prompts, text, ns.new_tokens)
            st = llm.stats()
        finally:
            llm.close()
        pages = st["tier_pages_stored"]
        fp16 = 2 * ps * loaded.args.num_kv_heads * loaded.args.head_dim * 2
        rows.append({"codec": name, "bytes_per_page": st["tier_encoded_bytes_stored"] / pages,
                     "ratio_vs_fp16": fp16 * pages / st["tier_encoded_bytes_stored"],
                     "attention_rel_error": att[name], **r})
    report = publish({"options": options,
              "text_tokens": len(text), "reference_ppl": ref_ppl, "prompts": len(prompts),
              "new_tokens": ns.new_tokens, "results": rows,
              "int8_keys_per_token_attention_rel_error": att.get("int8-keys-per-token")}, format_table, ns.json)
    return 0


def format_table(report: dict[str, Any]) -> str:
    ref = report["reference_ppl"]
    lines = [f"reference (no pool): perplexity {ref:.3f} on {report['text_tokens']} tokens",
             "| codec | bytes/page | vs FP16 | attn rel err | KL | ppl | ppl vs ref | "
             "agreement (forced) | identical (free) | identical sequences |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(
            f"| {r['codec']} | {r['bytes_per_page']:,.0f} | {r['ratio_vs_fp16']:.2f}x | "
            f"{r['attention_rel_error']:.4f} | {r['kl']:.5f} | {r['ppl']:.3f} | "
            f"{100 * (r['ppl'] / ref - 1):+.2f}% | {100 * r['agreement_forced']:.2f}% | "
            f"{100 * r['identical_free']:.1f}% | {r['identical_sequences']}/{report['prompts']} |")
    if report.get("int8_keys_per_token_attention_rel_error") is not None:
        lines.append(f"(int8 with keys per token instead of per channel: attn rel err "
                     f"{report['int8_keys_per_token_attention_rel_error']:.4f})")
    return "\n".join(lines)
