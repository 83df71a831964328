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
from speckv.models.args import ModelArgs
from speckv.models.loaded import load_model
from speckv.models.quant import QuantWeight

FORMATS = sorted(quant.FORMATS)


def _quantized(fmt: str, rows: int, cols: int, seed: int) -> tuple[QuantWeight, torch.Tensor]:
    """A random weight quantized by gguf-py, and gguf-py's own dequantization of its
    blocks: the independent reference. gguf-py cannot quantize to K-quants: their
    blocks are random bytes, with fp16 super-block scales of a weight's size."""
    from gguf import GGMLQuantizationType, quants

    g = torch.Generator().manual_seed(seed)
    qtype = GGMLQuantizationType[fmt]
    if fmt in quant.BLOCK_ELEMENTS:
        size, supers = quant.BLOCK_BYTES[fmt], rows * cols // quant.SUPER
        blocks = torch.randint(0, 256, (supers, size), generator=g, dtype=torch.uint8)
        scales = (torch.rand(supers, 2, generator=g) * 0.02 + 1e-3).half().view(torch.uint8)
        if fmt == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and minimums, 128 of codes
            blocks[:, 0:4] = scales
        else:  # Q6_K: 192 bytes of codes, 16 int8 scales, d
            blocks[:, 208:210] = scales[:, :2]
        blocks = blocks.reshape(rows, -1).numpy()
    else:
        blocks = quants.quantize(torch.randn(rows, cols, generator=g).numpy(), qtype)
    reference = torch.from_numpy(quants.dequantize(blocks, qtype).astype(np.float32))
    return QuantWeight.from_blocks(torch.from_numpy(blocks), fmt), reference


def _cols(fmt: str, cols: int) -> int:
    """K-quant rows are whole super-blocks: 768 = a kernel chunk of 16 blocks and 8 more."""
    return 768 if fmt in quant.BLOCK_ELEMENTS else cols


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_gguf_py_bit_for_bit(fmt):
    cols = _cols(fmt, 96)
    w, ref = _quantized(fmt, 37, cols, seed=1)
    assert (w.out_features, w.in_features, w.format) == (37, cols, fmt)
    assert w.codes.shape == (37, cols // 32 * quant.CODE_BYTES[fmt])
    assert torch.equal(quant.dequantize(w), ref)
    rows = torch.tensor([36, 0, 5, 5])
    assert torch.equal(quant.embedding(rows, w), ref[rows])
    assert torch.equal(quant.dequantize(w.rows(5, 9)), ref[5:9])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 3, 4, 5, 8, 9, 12, 16, 21, 47, 48, 130])
def test_quant_matmul_matches_a_float64_reference(fmt, tokens):
    # 37 rows: tiles of 4 (2 from 5 to 8 tokens) rows and a remainder; 47 / 48 tokens:
    # either side of the switch to the GEMM path; 9-47: groups of 8 tokens and a tail
    cols = _cols(fmt, 160)
    w, reference = _quantized(fmt, 37, cols, seed=tokens)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(0))
    y = quant.linear(x, w)
    ref = x.double() @ reference.double().t()
    assert y.dtype == torch.float32 and y.shape == (tokens, 37)
    assert (y.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


_BINDING = """
#include <torch/extension.h>
torch::Tensor quant_matmul(torch::Tensor, torch::Tensor, torch::Tensor, int64_t);
torch::Tensor dequantize_rows(torch::Tensor, torch::Tensor, int64_t, torch::Tensor);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_matmul", &quant_matmul);
  m.def("dequantize_rows", &dequantize_rows);
}
"""
# The kernel's instruction-set paths below the machine's own (which every other test
# here runs): each compiled alone with the wider extensions turned off.
_NARROWER = {"avx2": ("avx512f", ("-mno-avx512f",)),
             "portable": ("avx2", ("-mno-avx2", "-mno-avx512f"))}


@pytest.fixture(scope="module", params=sorted(_NARROWER))
def narrower_kernel(request, tmp_path_factory):
    from torch.utils.cpp_extension import load

    from speckv.kv import cpu_kernels

    above, flags = _NARROWER[request.param]
    if above not in cpu_kernels._cpu_features().split():
        pytest.skip(f"this CPU has no {above}: its own build already is the {request.param} path")
    directory = tmp_path_factory.mktemp(f"quant_{request.param}")
    (directory / "binding.cpp").write_text(_BINDING)
    source = cpu_kernels._SOURCES[2]
    assert source.name == "quant_matmul.cpp"
    return load(name=f"speckv_quant_{request.param}", verbose=False,
                sources=[str(source), str(directory / "binding.cpp")],
                extra_cflags=[*cpu_kernels._CFLAGS, *flags],
                extra_ldflags=list(cpu_kernels._LDFLAGS), build_directory=str(directory))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_instruction_set_path_matches_the_reference(narrower_kernel, fmt):
    # 37 rows: a remainder after the 4-row groups; the token counts cover every tile
    # shape of both SIMD paths (1; 2-4; 5-8; groups of 8 and a tail) and the GEMM switch
    cols = _cols(fmt, 576)  # 18 blocks: a whole chunk of 16 and a partial one
    w, reference = _quantized(fmt, 37, cols, seed=7)
    code = quant.FORMATS[fmt]
    every_row = torch.empty(0, dtype=torch.long)
    assert torch.equal(narrower_kernel.dequantize_rows(w.codes, w.scales, code, every_row),
                       reference)
    for tokens in (1, 2, 3, 4, 5, 8, 9, 20, 47, 48):
        x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens))
        y = narrower_kernel.quant_matmul(x, w.codes, w.scales, code)
        ref = x.double() @ reference.double().t()
        assert (y.double() - ref).abs().max().item() < 1e-4 * ref.abs().max().item(), tokens


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
    with pytest.raises(ValueError,
                       match="weight format 'Q5_K' is not one of Q4_0, Q4_1, Q8_0, Q4_K, Q6_K"):
        QuantWeight.from_blocks(torch.zeros(2, 40, dtype=torch.uint8), "Q5_K")
    q4k = quant.FORMATS["Q4_K"]  # 4 blocks of 32: half a super-block
    with pytest.raises(RuntimeError, match="K-quant rows must hold whole super-blocks of 256"):
        kernels.quant_matmul(torch.randn(2, 128), torch.zeros(8, 64, dtype=torch.uint8),
                             torch.zeros(8, 9, dtype=torch.float16), q4k)


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
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
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


def test_a_k_quant_mix_is_multiplied_as_the_file_has_it():
    """What llama.cpp's Q4_K_M writes: q and k in Q4_K, v in Q6_K (one fused projection
    of two formats), gate/up in Q5_0 (held as Q8_0), down in Q6_K. Kept quantized, the
    model computes what its dequantized twin does."""
    from speckv.models.llama import LlamaModel

    args = ModelArgs(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=64, rope_theta=1e4,
                     rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True,
                     bos_token_id=None, eos_token_id=None)
    formats = {"q": "Q4_K", "k": "Q4_K", "v": "Q6_K", "o": "Q4_K", "gate": "Q5_0",
               "up": "Q5_0", "down": "Q6_K"}
    shapes = {"q": (256, 256), "k": (128, 256), "v": (128, 256), "o": (256, 256),
              "gate": (512, 256), "up": (512, 256), "down": (256, 512)}
    where = {x: f"self_attn.{x}_proj" for x in "qkvo"}
    where |= {x: f"mlp.{x}_proj" for x in ("gate", "up", "down")}
    state = {"model.embed_tokens.weight": torch.randn(64, 256),
             "model.norm.weight": torch.ones(256)}
    for i in range(2):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = state[p + "post_attention_layernorm.weight"] = \
            torch.ones(256)
        for j, (x, fmt) in enumerate(formats.items()):
            w, _ = _quantized(fmt, *shapes[x], seed=10 * i + j)
            state[p + where[x] + ".weight"] = w
    models = {wq: LlamaModel(args, dict(state), device=torch.device("cpu"), dtype=torch.float32,
                             max_len=64, weight_quant=wq) for wq in ("auto", "none")}
    layer = models["auto"].layers[0]
    assert isinstance(layer.wqkv, quant.StackedWeight)
    assert [w.format for w in layer.wqkv.parts] == ["Q4_K", "Q6_K"]  # q + k fused, then v
    assert (layer.w_gate_up.format, layer.w_down.format, layer.wo.format) == (
        "Q8_0", "Q6_K", "Q4_K")
    assert models["auto"]._wq[0].format == "Q4_K"  # q's rows: the first part's
    ids = torch.arange(1, 17)
    logits = {wq: m.compute_logits(m.forward(ids, torch.arange(16), _causal(m)))
              for wq, m in models.items()}
    scale = logits["none"].abs().max().item()
    assert (logits["auto"] - logits["none"]).abs().max().item() < 1e-4 * scale


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
    out = llm.generate("The sea is", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    with pytest.raises(ValueError, match="weight_quant=int4 runs on the CPU in float32 only"):
        load_model(ModelConfig(device="cuda", weight_quant="int4"))
