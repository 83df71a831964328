"""The Llama-family decoder: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

Tokens of all sequences in a step are flattened into one dimension T (vLLM style):
the projections and the MLP run once over [T, hidden]; only attention needs to
know which token belongs to which sequence, and that is the job of the
`LayerAttention` passed in (it appends K/V to the paged cache and attends).

Weights are kept fused and transposed for `x @ W` ([in, out], measured faster than
`F.linear` for small batches on CPU): `wqkv` [hidden, (H + 2*Hkv) * D],
`w_gate_up` [hidden, 2 * I].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from speckv.models.args import ModelArgs


class LayerAttention(Protocol):
    """Appends a layer's new K/V to the cache and attends; owned by the KV cache."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> attention output [T, H, D]."""
        ...


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: torch.Tensor  # [hidden, (H + 2*Hkv) * D]
    wo: torch.Tensor  # [H * D, hidden]
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: torch.Tensor  # [hidden, 2 * I]
    w_down: torch.Tensor  # [I, hidden]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op; the same numbers as below
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()  # lower precisions normalize in float32, as HF does
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(args: ModelArgs, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, D], the rotate-half layout (each frequency twice)."""
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64)
                                          / args.head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """Weights and the forward pass of a Llama-family decoder."""

    def __init__(self, args: ModelArgs, state_dict: dict[str, torch.Tensor], *,
                 device: torch.device, dtype: torch.dtype, max_len: int) -> None:
        """Converts `state_dict` (HF names; consumed: tensors are popped as converted)."""
        self.args = args
        self.device = device
        self.dtype = dtype
        self.max_len = max_len

        def take(name: str) -> torch.Tensor:
            # pop: each source tensor is freed once converted, halving peak memory at load
            if name not in state_dict:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return state_dict.pop(name).to(device=device, dtype=dtype)

        def transposed(*names: str) -> torch.Tensor:
            return torch.cat([take(n) for n in names], dim=0).t().contiguous()

        self.layers: list[LayerWeights] = []
        for i in range(args.num_layers):
            p = f"model.layers.{i}."
            self.layers.append(LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"),
                wqkv=transposed(*(p + f"self_attn.{x}_proj.weight" for x in "qkv")),
                wo=transposed(p + "self_attn.o_proj.weight"),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                w_gate_up=transposed(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                w_down=transposed(p + "mlp.down_proj.weight"),
            ))
        self.embed = take("model.embed_tokens.weight")  # [V, hidden]
        self.norm = take("model.norm.weight")
        self.lm_head = (self.embed.t().contiguous() if args.tie_word_embeddings
                        else transposed("lm_head.weight"))  # [hidden, V]
        self.cos, self.sin = rope_tables(args, max_len, device, dtype)
        self._q_dim = args.num_heads * args.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: LayerAttention,
                layer_input: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (normed).

        `layer_input(i, x)`, if given, sees each layer's input x: [T, hidden] first (the
        prefetcher's speculative query reads it)."""
        a = self.args
        x = F.embedding(input_ids, self.embed)  # [T, hidden]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        num_tokens = input_ids.shape[0]
        for i, w in enumerate(self.layers):
            if layer_input is not None:
                layer_input(i, x)
            h = rms_norm(x, w.attn_norm, a.rms_norm_eps)
            qkv = (h @ w.wqkv).view(num_tokens, -1, a.head_dim)  # [T, H + 2*Hkv, D]
            qk = apply_rope(qkv[:, :a.num_heads + a.num_kv_heads], cos, sin)  # q and k at once
            q, k = qk.split([a.num_heads, a.num_kv_heads], dim=1)
            v = qkv[:, a.num_heads + a.num_kv_heads:]
            o = attention(i, q, k, v)  # [T, H, D]
            x = x + o.reshape(num_tokens, self._q_dim) @ w.wo
            h = rms_norm(x, w.mlp_norm, a.rms_norm_eps)
            gate, up = (h @ w.w_gate_up).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ w.w_down
        return rms_norm(x, self.norm, a.rms_norm_eps)

    def project_query(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s queries for the residual stream x: [T, hidden] -> [T, H, D] (with
        RoPE at `positions`). Fed another layer's input, an estimate (InfiniGen)."""
        a, w = self.args, self.layers[layer]
        h = rms_norm(x, w.attn_norm, a.rms_norm_eps)
        q = (h @ w.wqkv[:, :self._q_dim]).view(x.shape[0], a.num_heads, a.head_dim)
        return apply_rope(q, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, V] in float32."""
        return (hidden @ self.lm_head).float()
