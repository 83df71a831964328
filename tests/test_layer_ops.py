"""The decoder's fused CPU ops (csrc/layer_ops.cpp) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch

from speckv.models import quant
from speckv.models.args import ModelArgs
from speckv.models.llama import apply_rope, rms_norm, rope_tables


@pytest.fixture(scope="module")
def ops():
    return quant.fused_ops(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_rms_norm_and_the_fused_residual_add(ops, tokens):
    g = torch.Generator().manual_seed(tokens)
    x, delta = torch.randn(tokens, 576, generator=g), torch.randn(tokens, 576, generator=g)
    w = torch.rand(576, generator=g) + 0.5
    assert torch.allclose(ops.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5), atol=1e-5)
    wide = torch.randn(tokens, 600, generator=g)  # rows with a stride: a view
    assert torch.allclose(ops.rms_norm(wide[:, :576], w, 1e-5), rms_norm(wide[:, :576], w, 1e-5),
                          atol=1e-5)
    expected_x = x + delta
    out = ops.add_rms_norm_(x, delta, w, 1e-5)
    assert torch.equal(x, expected_x)  # the residual, added in place
    assert torch.allclose(out, rms_norm(expected_x, w, 1e-5), atol=1e-5)


def test_rope_in_place_rotates_only_the_first_heads(ops):
    args = ModelArgs(vocab_size=10, hidden_size=64, intermediate_size=8, num_layers=1,
                     num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                     rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True,
                     bos_token_id=None, eos_token_id=None)
    cos, sin = rope_tables(args, 64, torch.device("cpu"), torch.float32)
    qkv = torch.randn(5, 8, 16)
    positions = torch.tensor([0, 3, 63, 7, 7])
    expected = qkv.clone()
    expected[:, :6] = apply_rope(qkv[:, :6], cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    ops.rope_(qkv, cos, sin, positions, 6)
    assert torch.allclose(qkv, expected, atol=1e-6)
    assert torch.equal(qkv[:, 6:], expected[:, 6:])  # v untouched


@pytest.mark.parametrize("tokens", [1, 9, 100])
def test_silu_mul_of_the_fused_gate_up_projection(ops, tokens):
    g = torch.Generator().manual_seed(tokens)
    gate_up = torch.randn(tokens, 2 * 1536, generator=g) * 6  # both tails of silu
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.allclose(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up,
                          rtol=1e-5, atol=1e-6)
    wide = torch.randn(tokens, 2 * 1536 + 8, generator=g)  # rows with a stride: a view
    gate, up = wide[:, :-8].chunk(2, dim=-1)
    assert torch.allclose(ops.silu_mul(wide[:, :-8]), torch.nn.functional.silu(gate) * up,
                          rtol=1e-5, atol=1e-6)


def test_layer_ops_reject_bad_inputs(ops):
    with pytest.raises(RuntimeError, match=r"weight must be float32 \[hidden\]"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="delta float32 of its shape"):
        ops.add_rms_norm_(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5)
    cos = torch.ones(4, 16)
    with pytest.raises(RuntimeError, match="position 4 outside the tables"):
        ops.rope_(torch.randn(1, 2, 16), cos, cos, torch.tensor([4]), 2)
    with pytest.raises(RuntimeError, match=r"gate_up must be float32 \[T, 2 \* intermediate\]"):
        ops.silu_mul(torch.randn(2, 7))
