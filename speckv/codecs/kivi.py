"""KIVI (Liu et al., 2024): asymmetric low-bit KV, keys per channel, values per token.

Keys are quantized per channel in groups along tokens (the group is the page's
`page_size` tokens), values per token in groups of `head_dim` channels. Each group
stores an fp16 scale and zero point (its min); codes are packed 8/bits per byte.

Error bound (per element): |x - x'| <= scale / 2 + fp16 rounding of scale and
zero point, with scale = (max - min) / (2**bits - 1) of the group.
"""

from __future__ import annotations

import torch

from speckv.codecs.base import (Codec, EncodedPages, PageShape, align8, pack_rows,
                                unpack_rows)


def quantize_asymmetric(x: torch.Tensor, dim: int, bits: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x -> (codes uint8 in [0, 2**bits), fp16 scale, fp16 zero), groups along `dim`."""
    levels = 2 ** bits - 1
    x = x.float()
    lo = x.amin(dim=dim, keepdim=True).to(torch.float16)
    hi = x.amax(dim=dim, keepdim=True)
    scale = ((hi - lo.float()) / levels).to(torch.float16)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    codes = torch.round((x - lo.float()) / safe).clamp_(0, levels).to(torch.uint8)
    return codes, scale, lo


def asymmetric_bound(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """Half a step of x's group, plus fp16 rounding of the zero point (half a spacing of
    min) and of the step (times the largest code), plus float rounding."""
    levels = 2 ** bits - 1
    x = x.float()
    lo = x.amin(dim=dim, keepdim=True)
    step = (x.amax(dim=dim, keepdim=True) - lo) / levels
    fp16 = 2.0 ** -11
    bound = step / 2 + lo.abs() * fp16 + step * levels * fp16 * 2 + x.abs() * 2.0 ** -20
    return bound.expand_as(x)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [n, m] (m divisible by 8/bits) -> packed uint8 [n, m * bits / 8]."""
    per = 8 // bits
    c = codes.reshape(codes.shape[0], -1, per)
    packed = c[..., 0].clone()
    for i in range(1, per):  # uint8 shifts and ors: no wider intermediates
        packed |= c[..., i] << (i * bits)
    return packed


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [n, k] -> [n, k * 8 / bits] codes."""
    per = 8 // bits
    mask = 2 ** bits - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)


class _Kivi(Codec):
    bits: int

    def __init__(self, shape: PageShape) -> None:
        super().__init__(shape)
        s = shape
        self._elems = (s.page_size, s.num_kv_heads, s.head_dim)
        n_elems = s.page_size * s.num_kv_heads * s.head_dim
        if n_elems * self.bits % 8:
            raise ValueError(f"{self.name} needs page_size * heads * head_dim divisible by "
                             f"{8 // self.bits}")
        self._packed = n_elems * self.bits // 8
        self._k_group = (1, s.num_kv_heads, s.head_dim)
        self._v_group = (s.page_size, s.num_kv_heads, 1)
        self._bytes = 2 * self._packed + 2 * 2 * (s.num_kv_heads * s.head_dim
                                                   + s.page_size * s.num_kv_heads)

    @property
    def slot_bytes(self) -> int:
        return align8(self._bytes)

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return asymmetric_bound(k, 1, self.bits), asymmetric_bound(v, 3, self.bits)

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedPages:
        n = k.shape[0]
        kq, ks, kz = quantize_asymmetric(k, 1, self.bits)  # per channel, along tokens
        vq, vs, vz = quantize_asymmetric(v, 3, self.bits)  # per token, along channels
        data = pack_rows([pack_bits(kq.view(n, -1), self.bits), pack_bits(vq.view(n, -1), self.bits),
                          ks, kz, vs, vz], self.slot_bytes)
        return EncodedPages(data, torch.full((n,), self._bytes, dtype=torch.int64))

    def decode(self, data, out=None):
        n = data.shape[0]
        kp, vp, ks, kz, vs, vz = unpack_rows(data, [
            (torch.uint8, (self._packed,)), (torch.uint8, (self._packed,)),
            (torch.float16, self._k_group), (torch.float16, self._k_group),
            (torch.float16, self._v_group), (torch.float16, self._v_group)])
        dt = self.shape.dtype
        kq = unpack_bits(kp, self.bits).view(n, *self._elems)
        vq = unpack_bits(vp, self.bits).view(n, *self._elems)
        if out is None:
            out = (torch.empty(n, *self._elems, dtype=dt, device=data.device),
                   torch.empty(n, *self._elems, dtype=dt, device=data.device))
        out[0].copy_(kq).mul_(ks.to(dt)).add_(kz.to(dt))
        out[1].copy_(vq).mul_(vs.to(dt)).add_(vz.to(dt))
        return out


class Kivi4Codec(_Kivi):
    """KIVI with 4-bit codes."""

    bits = 4

    @property
    def row_format(self) -> str | None:
        return "kivi4" if self.shape.dtype == torch.float32 else None


class Kivi2Codec(_Kivi):
    """KIVI with 2-bit codes."""

    bits = 2
