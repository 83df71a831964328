"""Codecs that cast or quantize symmetrically: `none`, `fp16`, `bf16`, `int8`.

Error bounds (per element, before attention):
    none        exact.
    fp16, bf16  the cast's rounding: relative 2**-11 (fp16) or 2**-8 (bf16).
    int8        |x - x'| <= scale / 2 (+ fp16 rounding of the scale, relative
                2**-11 of |x|), scale = max|x| / 127 over the quantization group.
"""

from __future__ import annotations

import torch

from speckv.codecs.base import (Codec, EncodedPages, PageShape, align8, pack_rows,
                                unpack_rows)


class _Cast(Codec):
    """Stores each element in `store_dtype` (no scales)."""

    store_dtype: torch.dtype

    def __init__(self, shape: PageShape) -> None:
        super().__init__(shape)
        s = shape
        self._elems = (s.page_size, s.num_kv_heads, s.head_dim)
        self._bytes = 2 * s.page_size * s.num_kv_heads * s.head_dim * self.target.itemsize

    @property
    def target(self) -> torch.dtype:
        return self.store_dtype

    @property
    def slot_bytes(self) -> int:
        return align8(self._bytes)

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.target == self.shape.dtype:
            return torch.zeros_like(k), torch.zeros_like(v)
        eps = torch.finfo(self.target).eps  # spacing at 1: twice the relative rounding
        # half a spacing of the stored value, plus the flush of fp16 subnormals
        tiny = torch.finfo(self.target).tiny
        return k.abs() * eps / 2 + tiny, v.abs() * eps / 2 + tiny

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedPages:
        data = pack_rows([k.to(self.target), v.to(self.target)], self.slot_bytes)
        return EncodedPages(data, torch.full((data.shape[0],), self._bytes, dtype=torch.int64))

    def decode(self, data, out=None):
        k, v = unpack_rows(data, [(self.target, self._elems)] * 2)
        if self.target == self.shape.dtype:
            return k, v  # views of the rows: no copy here
        if out is None:
            return k.to(self.shape.dtype), v.to(self.shape.dtype)
        return out[0].copy_(k), out[1].copy_(v)


class NoneCodec(_Cast):
    """The page's bytes as they are in the device dtype. Lossless."""

    lossless = True

    @property
    def target(self) -> torch.dtype:
        return self.shape.dtype

    @property
    def row_format(self) -> str | None:
        return "raw" if self.shape.dtype == torch.float32 else None


class Fp16Codec(_Cast):
    """IEEE half precision: relative rounding 2**-11, range +-65504."""

    store_dtype = torch.float16


class Bf16Codec(_Cast):
    """bfloat16: relative rounding 2**-8, the float32 range."""

    store_dtype = torch.bfloat16


def quantize_symmetric(x: torch.Tensor, dim: int, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (int codes in [-(2**(b-1)-1), 2**(b-1)-1] as int8, fp16 scale with `dim` kept as 1)."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.float().abs().amax(dim=dim, keepdim=True)
    scale = (amax / qmax).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round(x.float() / safe).clamp_(-qmax, qmax).to(torch.int8)
    return codes, scale


def symmetric_bound(x: torch.Tensor, dim: int, bits: int = 8) -> torch.Tensor:
    """Half a quantization step of x's group, the step's fp16 rounding (up to half an
    fp16 spacing times the largest code) and float rounding of the product."""
    qmax = 2 ** (bits - 1) - 1
    step = x.float().abs().amax(dim=dim, keepdim=True) / qmax
    return (step / 2 + step * qmax * 2.0 ** -11 + x.float().abs() * 2.0 ** -20).expand_as(x)


class Int8Codec(Codec):
    """Symmetric 8-bit codes with one fp16 scale per group.

    Keys are grouped per channel (one scale per page, KV head and channel, over the
    page's tokens): a few key channels carry outliers, and a per-token scale would
    spend the 8 bits on them (measured on the bundled model: attention-output
    relative error 1.00% per channel vs 1.87% per token, `speckv bench fidelity`,
    BENCHMARKS.md). Values are grouped per token
    and head (one scale over head_dim), where they have no channel outliers.
    """

    key_dim, value_dim = 1, 3  # [n, page_size, Hkv, D]: reduce tokens for K, channels for V

    def __init__(self, shape: PageShape) -> None:
        super().__init__(shape)
        s = shape
        self._elems = (s.page_size, s.num_kv_heads, s.head_dim)
        self._k_scale = (1, s.num_kv_heads, s.head_dim)
        self._v_scale = (s.page_size, s.num_kv_heads, 1)
        self._bytes = 2 * s.page_size * s.num_kv_heads * s.head_dim + 2 * (
            s.num_kv_heads * s.head_dim + s.page_size * s.num_kv_heads)

    @property
    def slot_bytes(self) -> int:
        return align8(self._bytes)

    @property
    def row_format(self) -> str | None:
        return "int8" if self.shape.dtype == torch.float32 else None

    @property
    def scale_specs(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        return [(torch.float16, self._k_scale), (torch.float16, self._v_scale)]

    def quantize(self, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        """-> [k codes, v codes] (int8 [n, ps, Hkv, D]) + [k scales, v scales] (fp16)."""
        kq, ks = quantize_symmetric(k, self.key_dim)
        vq, vs = quantize_symmetric(v, self.value_dim)
        return [kq, vq, ks, vs]

    def dequantize(self, kq, vq, ks, vs, out=None) -> tuple[torch.Tensor, torch.Tensor]:
        dt = self.shape.dtype
        if out is None:
            out = (torch.empty(kq.shape, dtype=dt, device=kq.device),
                   torch.empty(vq.shape, dtype=dt, device=vq.device))
        # convert, then scale in place: measured 2-4x faster than one mixed-dtype mul
        return out[0].copy_(kq).mul_(ks.to(dt)), out[1].copy_(vq).mul_(vs.to(dt))

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return symmetric_bound(k, self.key_dim), symmetric_bound(v, self.value_dim)

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedPages:
        data = pack_rows(self.quantize(k, v), self.slot_bytes)
        return EncodedPages(data, torch.full((data.shape[0],), self._bytes, dtype=torch.int64))

    def decode(self, data, out=None):
        codes = [(torch.int8, self._elems)] * 2
        return self.dequantize(*unpack_rows(data, codes + self.scale_specs), out=out)
