"""Quantized weights (F8): the weight-only kernel against a reference matmul for every
GGUF block format, the bundled Q4_1 model through the kernel against the same model
dequantized at load, `--weight-quant` for float checkpoints, and its bad values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speckv import LLM, SamplingParams
from speckv.config import ModelConfig
from speckv.models import quant
from speckv.models.loaded import load_model
from speckv.models.quant import QuantWeight

FORMATS = sorted(quant.FORMATS)


def _quantized(fmt: str, rows: int, cols: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """A random weight quantized by gguf-py, and gguf-py's own dequantization of its
    blocks: the independent reference."""
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(seed)
    qtype = GGMLQuantizationType[fmt]
    blocks = quants.quantize(torch.randn(rows, cols, generator=g).numpy(), qtype)
    reference = torch.from_numpy(quants.dequantize(blocks, qtype).astype(np.float32))
    return QuantWeight.from_blocks(torch.from_numpy(blocks), fmt), reference


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_gguf_py_bit_for_bit(fmt):
    w, ref = _quantized(fmt, 37, 96, seed=1)
    assert (w.out_features, w.in_features, w.format) == (37, 96, fmt)
    assert w.codes.shape == (37, 3 * {"Q4_0": 16, "Q4_1": 16, "Q8_0": 32}[fmt])
    assert torch.equal(quant.dequantize(w), ref)
    rows = torch.tensor([36, 0, 5, 5])
    assert torch.equal(quant.embedding(rows, w), ref[rows])
    assert torch.equal(quant.dequantize(w.rows(5, 9)), ref[5:9])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 9, 47, 48, 130])
def test_quant_matmul_matches_a_float64_reference(fmt, tokens):
    # 37 rows: tiles of 4 rows and a remainder; 47 / 48 tokens: either side of the switch
    # to the GEMM path; 5, 9: token tiles of 4 and tails
    w, reference = _quantized(fmt, 37, 160, seed=tokens)
    x = torch.randn(tokens, 160, generator=torch.Generator().manual_seed(0))
    y = quant.linear(x, w)
    ref = x.double() @ reference.double().t()
    assert y.dtype == torch.float32 and y.shape == (tokens, 37)
    assert (y.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_quant_matmul_reads_a_non_contiguous_input_and_no_tokens():
    w, reference = _quantized("Q4_1", 8, 64, seed=3)
    x = torch.randn(64, 6).t()  # [6, 64], not contiguous
    assert torch.allclose(quant.linear(x, w), x @ reference.t(), atol=1e-4)
    assert quant.linear(torch.empty(0, 64), w).shape == (0, 8)


def test_quant_matmul_rejects_bad_shapes_and_formats():
    kernels = quant._kernels()
    w = quant.quantize(torch.randn(8, 64), "Q8_0")
    q8 = quant.FORMATS["Q8_0"]
    with pytest.raises(RuntimeError, match=r"x must be float32 \[T, 64\]"):
        kernels.quant_matmul(torch.randn(2, 32), w.codes, w.scales, q8)
    with pytest.raises(RuntimeError, match="x must be float32"):
        kernels.quant_matmul(torch.randn(2, 64, dtype=torch.float64), w.codes, w.scales, q8)
    with pytest.raises(RuntimeError, match="unknown weight format 7"):
        kernels.quant_matmul(torch.randn(2, 64), w.codes, w.scales, 7)
    with pytest.raises(RuntimeError, match=r"scales must be contiguous float16 \[N, 8\]"):
        kernels.quant_matmul(torch.randn(2, 64), w.codes, w.scales, quant.FORMATS["Q4_1"])
    with pytest.raises(RuntimeError, match="row out of range"):
        kernels.dequantize_rows(w.codes, w.scales, q8, torch.tensor([8]))
    with pytest.raises(ValueError, match="not a multiple of 32"):
        quant.quantize(torch.randn(4, 40), "Q8_0")
    with pytest.raises(ValueError, match=r"Q4_1 blocks must be uint8 \[out, k \* 20\]"):
        QuantWeight.from_blocks(torch.zeros(2, 30, dtype=torch.uint8), "Q4_1")
    with pytest.raises(ValueError, match="weight format 'Q5_K' is not one of Q4_0, Q4_1, Q8_0"):
        QuantWeight.from_blocks(torch.zeros(2, 40, dtype=torch.uint8), "Q5_K")


def test_weight_quant_bad_values_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="weight_quant='int3' is not one of auto, none, int8, int4"):
        ModelConfig(weight_quant="int3")
    with pytest.raises(ValueError, match="weight_quant=int8 runs on the CPU in float32 only"):
        load_model(ModelConfig(device="cpu", dtype="bfloat16", weight_quant="int8"))


def test_bundled_model_keeps_its_q4_1_blocks(loaded):
    model = loaded.model
    assert loaded.config.weight_quant == "auto"
    layer = model.layers[0]
    assert isinstance(layer.wqkv, QuantWeight) and layer.wqkv.format == "Q4_1"
    a = loaded.args
    assert layer.wqkv.out_features == (a.num_heads + 2 * a.num_kv_heads) * a.head_dim
    assert layer.w_gate_up.out_features == 2 * a.intermediate_size
    assert isinstance(model.embed, QuantWeight) and model.embed.format == "Q8_0"
    assert model.lm_head is model.embed  # tied: the same weight
    # the file holds ~94 MB of blocks (codes and scales, split); float32 would be ~538 MB
    assert 80e6 < model.weight_bytes < 100e6


@pytest.fixture(scope="module")
def float_llm():
    """The bundled model dequantized to float32 at load (`weight_quant=none`)."""
    llm = LLM(weight_quant="none", device="cpu", device_kv_bytes="64MiB", max_num_seqs=8)
    assert not isinstance(llm.engine.model.layers[0].wqkv, QuantWeight)
    return llm


PROMPTS = ["Write one sentence about the sea.", "What is 17 times 3?", "List three colors.",
           "Explain gravity to a child.", "Translate 'good morning' into French.",
           "Name a prime number larger than 50.", "Why is the sky blue?",
           "Give me a haiku about autumn."]


@pytest.mark.slow
def test_quantized_path_decodes_the_float_paths_tokens(make_llm, float_llm):
    llm = make_llm(device_kv_bytes="64MiB", max_num_seqs=8)
    prompts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    quantized = llm.generate(prompts, params)
    dense = float_llm.generate(prompts, params)
    for q, d in zip(quantized, dense):
        assert q.token_ids == d.token_ids
    ids = llm.tokenizer.encode(prompts[0]) + quantized[0].token_ids
    diff = (llm.engine.score(ids) - float_llm.engine.score(ids)).abs().max().item()
    assert diff < 1e-3


def test_float_checkpoint_quantized_to_int8_and_int4(tmp_path):
    """A tiny float Llama saved by transformers, loaded with each weight_quant: int8 / int4
    keep Q8_0 / Q4_1 blocks and stay close to the float logits (int8 closer)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0")).save(
        str(tmp_path / "tokenizer.json"))
    ids = torch.arange(1, 21)
    logits, formats = {}, {}
    for wq in ("none", "auto", "int8", "int4"):
        model = load_model(ModelConfig(model=str(tmp_path), device="cpu", weight_quant=wq)).model
        w = model.layers[1].w_down
        formats[wq] = w.format if isinstance(w, QuantWeight) else None
        assert isinstance(model.lm_head, QuantWeight) == (formats[wq] is not None)
        logits[wq] = model.compute_logits(model.forward(ids, torch.arange(20), _causal(model)))
    assert formats == {"none": None, "auto": None, "int8": "Q8_0", "int4": "Q4_1"}
    assert torch.equal(logits["auto"], logits["none"])  # nothing quantized to keep
    err8 = (logits["int8"] - logits["none"]).abs().max().item()
    err4 = (logits["int4"] - logits["none"]).abs().max().item()
    scale = logits["none"].abs().max().item()
    assert 0 < err8 < err4 < 0.5 * scale


def _causal(model):
    group = model.args.num_heads // model.args.num_kv_heads

    def attend(layer, q, k, v):
        k, v = (t.repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v,
                                                               is_causal=True)
        return out.transpose(0, 1)

    return attend


@pytest.mark.cuda
def test_on_cuda_auto_expands_the_weights_and_int4_is_refused():
    """The weight-only kernel is CPU code: on CUDA `auto` runs the float path (dense
    weights in the dtype), and int8 / int4 say where they run."""
    llm = LLM(device="cuda", weight_quant="auto", device_kv_bytes="64MiB")
    layer = llm.engine.model.layers[0]
    assert not isinstance(layer.wqkv, QuantWeight) and layer.wqkv.is_cuda
    out = llm.generate("The sea is", SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    with pytest.raises(ValueError, match="weight_quant=int4 runs on the CPU in float32 only"):
        load_model(ModelConfig(device="cuda", weight_quant="int4"))
