"""The Llama-family decoder: RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

One module serves the families (`ModelArgs`): they share every layer and differ in
three switches of the attention's projections -- biases on q, k, v (Qwen2; and o with
Llama's attention_bias), an RMSNorm over each head of q and k before RoPE (Qwen3) --
and in RoPE's frequencies (`speckv.models.rope`).

Tokens of all sequences in a step are flattened into one dimension T (vLLM style):
the projections and the MLP run once over [T, hidden]; only attention needs to
know which token belongs to which sequence, and that is the job of the
`LayerAttention` passed in (it appends K/V to the paged cache and attends).

Projections are fused (`wqkv`: q, k and v; `w_gate_up`: gate and up) and multiplied
through `quant.linear`: a float weight is kept transposed for `x @ W` ([in, out],
measured faster than `F.linear` for small batches on CPU), a quantized one as a
`QuantWeight` ([out, in], see `speckv.models.quant`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from speckv.models import quant, rope
from speckv.models.args import ModelArgs
from speckv.models.quant import QuantWeight, Weight, linear


class LayerAttention(Protocol):
    """Appends a layer's new K/V to the cache and attends; owned by the KV cache."""

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> attention output [T, H, D]."""
        ...


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    wqkv: Weight  # hidden -> (H + 2*Hkv) * D
    wo: Weight  # H * D -> hidden
    mlp_norm: torch.Tensor  # [hidden]
    w_gate_up: Weight  # hidden -> 2 * I
    w_down: Weight  # I -> hidden
    bqkv: torch.Tensor | None = None  # [(H + 2*Hkv) * D] (qkv_bias)
    bo: torch.Tensor | None = None  # [hidden] (o_bias)
    q_norm: torch.Tensor | None = None  # [D] (qk_norm)
    k_norm: torch.Tensor | None = None  # [D]


def leading_outputs(w: Weight, n: int) -> Weight:
    """The first n output features of a weight (q of a fused qkv)."""
    return w.rows(0, n) if isinstance(w, quant.QUANTIZED) else w[:, :n]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op; the same numbers as below
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()  # lower precisions normalize in float32, as HF does
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(args: ModelArgs, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_len, D], the rotate-half layout (each frequency twice), with the
    model's RoPE scaling (`speckv.models.rope`)."""
    freqs, scale = rope.inv_freq(args)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * scale).to(device, dtype), (angles.sin() * scale).to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaModel:
    """Weights and the forward pass of a Llama-family decoder."""

    def __init__(self, args: ModelArgs, state_dict: dict[str, torch.Tensor | QuantWeight], *,
                 device: torch.device, dtype: torch.dtype, max_len: int,
                 weight_quant: str = "none") -> None:
        """Converts `state_dict` (HF names; consumed: tensors are popped as converted).

        `weight_quant` (see `speckv.models.quant`): with "none" any `QuantWeight` is
        expanded to `dtype`; otherwise quantized matrices stay quantized (and with
        int8 / int4 float ones are quantized) where the kernel runs (CPU, float32)."""
        self.args = args
        self.device = device
        self.dtype = dtype
        self.max_len = max_len
        keep = quant.check_weight_quant(weight_quant, device, dtype)
        quantize_to = quant.QUANTIZE_TO.get(weight_quant)

        def pop(name: str) -> torch.Tensor | QuantWeight:
            # pop: each source tensor is freed once converted, halving peak memory at load
            if name not in state_dict:
                raise ValueError(f"checkpoint is missing tensor {name!r}")
            return state_dict.pop(name)

        def dense(t: torch.Tensor | QuantWeight) -> torch.Tensor:  # [out, in] floats
            t = quant.dequantize(t) if isinstance(t, QuantWeight) else t
            return t.to(device=device, dtype=dtype)

        def take(name: str) -> torch.Tensor:
            return dense(pop(name))

        def projection(*names: str) -> Weight:
            """A (fused) projection: quantized where kept, else [in, out] floats."""
            parts = [pop(n) for n in names]
            if keep and all(isinstance(p, QuantWeight) for p in parts) and (
                    len({p.in_features for p in parts}) == 1):
                return quant.concat(parts)
            merged = torch.cat([dense(p) for p in parts], dim=0)  # [out, in]
            if keep and quantize_to is not None:
                return quant.quantize(merged, quantize_to)
            return merged.t().contiguous()

        def table(name: str) -> Weight:  # an embedding table [V, hidden]
            t = pop(name)
            if keep and isinstance(t, QuantWeight):
                return t
            t = dense(t)
            return quant.quantize(t, quantize_to) if keep and quantize_to else t

        self.layers: list[LayerWeights] = []
        for i in range(args.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            self.layers.append(LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"),
                wqkv=projection(*(attn + f"{x}_proj.weight" for x in "qkv")),
                wo=projection(attn + "o_proj.weight"),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                w_gate_up=projection(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                w_down=projection(p + "mlp.down_proj.weight"),
                bqkv=torch.cat([take(attn + f"{x}_proj.bias") for x in "qkv"])
                if args.qkv_bias else None,
                bo=take(attn + "o_proj.bias") if args.o_bias else None,
                q_norm=take(attn + "q_norm.weight") if args.qk_norm else None,
                k_norm=take(attn + "k_norm.weight") if args.qk_norm else None,
            ))
        self.embed = table("model.embed_tokens.weight")  # [V, hidden]
        self.norm = take("model.norm.weight")
        if not args.tie_word_embeddings:
            self.lm_head = projection("lm_head.weight")
        elif isinstance(self.embed, QuantWeight):
            self.lm_head = self.embed  # [V, hidden]: already the [out, in] layout
        else:
            self.lm_head = self.embed.t().contiguous()  # [hidden, V]
        self.cos, self.sin = rope_tables(args, max_len, device, dtype)
        self._q_dim = args.num_heads * args.head_dim
        self._ops = quant.fused_ops(device, dtype)  # None: torch's ops
        self._wq = [leading_outputs(w.wqkv, self._q_dim) for w in self.layers]

    @property
    def element_size(self) -> int:
        """Bytes per element of activations and KV (`dtype`)."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one step streams (every matrix once, the embedding rows aside)."""
        def size(w: Weight) -> int:
            return w.nbytes if isinstance(w, quant.QUANTIZED) else w.numel() * w.element_size()
        layers = sum(size(w.wqkv) + size(w.wo) + size(w.w_gate_up) + size(w.w_down)
                     for w in self.layers)
        return layers + size(self.lm_head)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: LayerAttention,
                layer_input: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (normed).

        `layer_input(i, x)`, if given, sees each layer's input x: [T, hidden] first (the
        prefetcher's speculative query reads it)."""
        x = quant.embedding(input_ids, self.embed)  # [T, hidden]
        if self._ops is not None:
            return self._forward_fused(x, positions, attention, layer_input)
        a = self.args
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1)
        for i, w in enumerate(self.layers):
            if layer_input is not None:
                layer_input(i, x)
            qkv = self._qkv(w, rms_norm(x, w.attn_norm, a.rms_norm_eps))
            qk = apply_rope(qkv[:, :a.num_heads + a.num_kv_heads], cos, sin)  # q and k at once
            q, k = qk.split([a.num_heads, a.num_kv_heads], dim=1)
            v = qkv[:, a.num_heads + a.num_kv_heads:]
            o = attention(i, q, k, v)  # [T, H, D]
            x = x + self._out(w, o)
            h = rms_norm(x, w.mlp_norm, a.rms_norm_eps)
            gate, up = linear(h, w.w_gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, w.w_down)
        return rms_norm(x, self.norm, a.rms_norm_eps)

    def _forward_fused(self, x: torch.Tensor, positions: torch.Tensor, attention: LayerAttention,
                       layer_input: Callable[[int, torch.Tensor], None] | None) -> torch.Tensor:
        """`forward` on the CPU in float32: the same arithmetic, with each residual add
        fused into the next RMSNorm, RoPE applied in place and the MLP's silu(gate) * up
        in one pass (csrc/layer_ops.cpp)."""
        a, ops = self.args, self._ops
        eps, rotated = a.rms_norm_eps, a.num_heads + a.num_kv_heads
        delta = None  # the last MLP's output, added to x by the next norm
        for i, w in enumerate(self.layers):
            h = (ops.rms_norm(x, w.attn_norm, eps) if delta is None
                 else ops.add_rms_norm_(x, delta, w.attn_norm, eps))
            if layer_input is not None:
                layer_input(i, x)
            qkv = self._qkv(w, h)
            ops.rope_(qkv, self.cos, self.sin, positions, rotated)
            q, k, v = qkv.split([a.num_heads, a.num_kv_heads, a.num_kv_heads], dim=1)
            o = attention(i, q, k, v)  # [T, H, D]
            h = ops.add_rms_norm_(x, self._out(w, o), w.mlp_norm, eps)
            delta = linear(ops.silu_mul(linear(h, w.w_gate_up)), w.w_down)
        return ops.add_rms_norm_(x, delta, self.norm, eps)

    def _qkv(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """h: [T, hidden] normed -> q, k, v heads [T, H + 2*Hkv, D] before RoPE."""
        a = self.args
        qkv = linear(h, w.wqkv)
        if w.bqkv is not None:
            qkv += w.bqkv
        qkv = qkv.view(h.shape[0], -1, a.head_dim)
        if w.q_norm is not None:  # each head of q and of k normalized over D
            qk = a.num_heads + a.num_kv_heads
            qkv[:, :a.num_heads] = rms_norm(qkv[:, :a.num_heads], w.q_norm, a.rms_norm_eps)
            qkv[:, a.num_heads:qk] = rms_norm(qkv[:, a.num_heads:qk], w.k_norm, a.rms_norm_eps)
        return qkv

    def _out(self, w: LayerWeights, o: torch.Tensor) -> torch.Tensor:
        """Attention output [T, H, D] -> its projection [T, hidden]."""
        out = linear(o.reshape(o.shape[0], self._q_dim), w.wo)
        return out if w.bo is None else out + w.bo

    def project_query(self, layer: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s queries for the residual stream x: [T, hidden] -> [T, H, D] (with
        RoPE at `positions`). Fed another layer's input, an estimate (InfiniGen)."""
        a, w = self.args, self.layers[layer]
        h = rms_norm(x, w.attn_norm, a.rms_norm_eps)
        q = linear(h, self._wq[layer])
        if w.bqkv is not None:
            q += w.bqkv[:self._q_dim]
        q = q.view(x.shape[0], a.num_heads, a.head_dim)
        if w.q_norm is not None:
            q = rms_norm(q, w.q_norm, a.rms_norm_eps)
        return apply_rope(q, self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, V] in float32."""
        return linear(hidden, self.lm_head).float()
