"""Model families (F11): tiny random checkpoints made here with transformers' own config
and model classes, saved as HF directories, loaded by speckv: logits at every position
within 1e-4 of transformers', and greedy generation identical with paged batching and
chunked prefill. (Random weights check the architecture, never accuracy.)"""

from __future__ import annotations

import json

import pytest
import torch

from speckv import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-attention-bias": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True}),
    "llama3.1-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}),
    "linear-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "linear", "factor": 4.0}}),
    "yarn-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
    "dynamic-rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "dynamic", "factor": 2.0}}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # a window shorter than the contexts below and not a multiple of the pages (8)
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 12}),
}


def _save(tmp_path, family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**(SMALL | extra))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random biases and norms, so that a missing one shows
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.copy_(torch.randn_like(p) * 0.5 + (0 if name.endswith("bias") else 1))
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0")).save(
        str(tmp_path / "tokenizer.json"))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(family, tmp_path):
    hf = _save(tmp_path, family)
    llm = LLM(model=str(tmp_path), device="cpu", device_kv_bytes="4MiB", page_size=8,
              max_num_seqs=4, max_num_batched_tokens=24)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (50,), generator=g).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = llm.engine.score(ids, chunk_size=16)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 1e-4 * max(scale, 1.0)

    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 30, 17)]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                              min_new_tokens=10, pad_token_id=0)[0, len(prompt):]
        assert out.token_ids == ref.tolist()


def test_family_switches_are_read_from_the_config(tmp_path):
    from speckv.models.loader import hf_model_args

    def args(**config):
        (tmp_path / "config.json").write_text(json.dumps(config))
        return hf_model_args(json.loads((tmp_path / "config.json").read_text()), tmp_path)

    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    qwen2 = args(model_type="qwen2", **base)
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.sliding_window) == (
        True, False, False, None)
    assert args(model_type="qwen3", **base).qk_norm
    assert args(model_type="mistral", sliding_window=4096, **base).sliding_window == 4096
    assert args(model_type="llama", attention_bias=True, **base).o_bias
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    eos = args(model_type="llama", eos_token_id=5, **base)
    assert eos.eos_token_id == 5 and eos.stop_ids == {5, 7} and eos.eos_token_ids == (5, 7)


def test_unsupported_configs_are_refused_naming_what_is_supported(tmp_path):
    from speckv.models.loader import hf_model_args

    base = dict(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2)
    with pytest.raises(ValueError, match=r"model_type 'phi3' is not Llama-family "
                                         r"\(supported: llama, mistral, qwen2, qwen3\)"):
        hf_model_args({"model_type": "phi3", **base}, tmp_path)
    with pytest.raises(ValueError, match=r"rope scaling 'longrope' is not supported "
                                         r"\(supported: default, linear, dynamic, llama3, yarn\)"):
        hf_model_args({"model_type": "llama", "rope_scaling": {"rope_type": "longrope"},
                       **base}, tmp_path)
    with pytest.raises(ValueError, match="use_sliding_window=true"):
        hf_model_args({"model_type": "qwen2", "use_sliding_window": True, **base}, tmp_path)


def test_a_sliding_window_reads_only_the_window_s_pages(tmp_path):
    """Past its window a Mistral model reads only the pages the window covers, and its
    tokens are transformers' (torch and compiled kernels, pooled or not)."""
    hf = _save(tmp_path, "mistral-window")
    prompt = list(range(3, 43))  # 40 tokens: pages 0-4 of 8 tokens
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                          min_new_tokens=8, pad_token_id=0)[0, len(prompt):].tolist()

    def pooled_reads(max_tokens: int) -> int:
        """Pool rows read in place by a fresh engine whose DEVICE tier (8 pages) cannot
        hold the prompt's 2 x 5 pages: sealed pages are read from the pool."""
        llm = LLM(model=str(tmp_path), device="cpu", page_size=8, device_kv_bytes="16KiB",
                  pool="local", pool_bytes="4MiB")
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                    ignore_eos=True))
        assert out[0].token_ids == ref[:max_tokens]
        assert llm.engine.stats()["kv_read"] == "in_place"
        return llm.engine.stats()["tier_pages_read_in_place"]

    # 7 decode steps at contexts 41..47 (queries at 40..46, keys from position - 11):
    # 41-43 read pages 3 and 4, 44-47 page 4 only (page 5 is DEVICE's open page), in each
    # of 2 layers: 2 * (3 * 2 + 4 * 1) = 20 (full attention would read pages 0-4: 70)
    assert pooled_reads(8) - pooled_reads(1) == 20
    for backend in ("torch", "cpu_kernel"):
        llm = LLM(model=str(tmp_path), device="cpu", page_size=8, device_kv_bytes="4MiB",
                  attention_backend=backend)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        assert llm.generate([prompt], params)[0].token_ids == ref


def test_selection_over_a_sliding_window_is_refused_by_name(tmp_path):
    _save(tmp_path, "mistral-window")
    with pytest.raises(ValueError, match="selector 'quest' over a sliding-window model"):
        LLM(model=str(tmp_path), device="cpu", device_kv_bytes="4MiB", selector="quest")
    llm = LLM(model=str(tmp_path), device="cpu", device_kv_bytes="4MiB")
    with pytest.raises(ValueError, match="window of 12 tokens"):
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2, selector="quest"))
    assert len(llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=2))[0].token_ids) == 2
    # a context that never outgrows the window: nothing is left out, every selector runs
    short = LLM(model=str(tmp_path), device="cpu", device_kv_bytes="4MiB", max_model_len=12,
                selector="quest")
    assert short.engine.window == 0


def test_generation_stops_at_any_of_the_eos_ids(tmp_path):
    hf = _save(tmp_path, "llama")
    ids = [5, 9, 11, 3]
    greedy = []
    with torch.no_grad():  # plain argmax: no EOS handling in the way
        for _ in range(6):
            greedy.append(int(hf(torch.tensor([ids + greedy])).logits[0, -1].argmax()))
    # config.json's EOS one greedy never picks; generation_config.json adds the first
    # greedy token (past the first) not seen before it: generation stops right there
    k = next(i for i in range(1, 6) if greedy[i] not in greedy[:i])
    never = next(t for t in range(3, VOCAB) if t not in greedy)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"eos_token_id": never}))
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [never, greedy[k]]}))
    llm = LLM(model=str(tmp_path), device="cpu", device_kv_bytes="4MiB")
    assert llm.engine.args.stop_ids == {never, greedy[k]}
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=6))[0]
    assert out.token_ids == greedy[:k + 1] and out.finish_reason == "stop"


def _write_gguf(hf, path, arch: str) -> None:
    """The tiny model as llama.cpp's converter writes it: `arch` keys, GGUF tensor names,
    Llama's q and k rows permuted for the interleaved RoPE (Qwen's left as they are)."""
    import gguf
    import numpy as np

    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def permute(t, heads):
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(
            t.shape)

    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in hf.state_dict().items():
        t = t.float().numpy()
        if name == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", t)
        elif name == "model.norm.weight":
            w.add_tensor("output_norm.weight", t)
        elif name == "lm_head.weight":
            w.add_tensor("output.weight", t)
        else:
            _, _, layer, rest = name.split(".", 3)
            module, suffix = rest.rsplit(".", 1)
            kind = names[module]
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                t = permute(t, c.num_attention_heads if kind == "attn_q" else c.num_key_value_heads)
            w.add_tensor(f"blk.{layer}.{kind}.{suffix}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_round_trip(family, tmp_path):
    hf = _save(tmp_path, family)
    path = tmp_path / f"{family}.gguf"
    _write_gguf(hf, path, family)
    llm = LLM(model=str(path), device="cpu", device_kv_bytes="4MiB", page_size=8)
    assert llm.engine.args.family == family and llm.engine.args.qkv_bias == (family == "qwen2")
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = llm.engine.score(ids, chunk_size=16)
    assert (got - expected).abs().max().item() < 1e-4 * max(expected.abs().max().item(), 1.0)
