"""speckv against an independent reference: the same GGUF run by HF transformers."""

from __future__ import annotations

import pytest
import torch

from speckv import SamplingParams
from tests.conftest import assert_no_leak, hf_greedy, run_to_completion

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "In 1492 Columbus sailed the ocean blue. In 1969 the first humans walked on the moon, "
    "and people around the world watched it on television. The next great journey",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf(llm, hf_model, prompt):
    ids = llm.tokenizer.encode(prompt)
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0]
    ours = llm.engine.score(ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_chunked_prefill_logits_match_unchunked(llm):
    ids = llm.tokenizer.encode(PROMPTS[2] * 3)
    whole = llm.engine.score(ids)
    chunked = llm.engine.score(ids, chunk_size=7)
    assert (whole - chunked).abs().max().item() < 1e-3
    assert_no_leak(llm.engine)


def test_greedy_32_tokens_single_request(llm, hf_model):
    ids = llm.tokenizer.encode(PROMPTS[0])
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(hf_model, ids, 32)
    assert out.finish_reason == "length" and out.num_generated_tokens == 32


@pytest.mark.slow
def test_greedy_batch_with_staggered_admission(make_llm, hf_model):
    """Different prompt lengths, joining the running batch at different steps, with
    prefill chunked (8 tokens a step): every request equals its solo HF generation."""
    llm = make_llm(device_kv_bytes="64MiB", max_num_batched_tokens=8, max_num_seqs=4)
    engine = llm.engine
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ids = {}
    for i, prompt in enumerate(prompts):
        ids[engine.add_request(prompt, params)] = i
        for _ in range(3 + 2 * i):  # the next request arrives mid-generation
            engine.step()
    finals = run_to_completion(engine)
    assert set(finals) == set(ids)
    for rid, i in ids.items():
        assert finals[rid].token_ids == hf_greedy(hf_model, prompts[i], 32), f"prompt {i}"
    assert_no_leak(engine)
