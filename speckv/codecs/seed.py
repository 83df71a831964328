"""CXL-SpecKV's compression pipeline, done correctly: INT8, delta, run-length.

1. Quantize to int8 exactly as codec `int8` does (so the error is int8's).
2. Delta-code each channel along the page's tokens *modulo 256*: the difference of
   two int8 codes needs 9 bits, and the public seed code stores it in an int8 and
   overflows; wrapping arithmetic is exactly invertible, so nothing is lost here.
3. Run-length code the delta bytes (channel-major, so one channel's tokens are
   consecutive) as (count, value) byte pairs, runs of at most 255.

Row: [u32 nbytes][fp16 scales (as int8)][u8 counts x r][u8 values x r]. KV codes
are noisy, so runs are short and stage 3 usually makes pages *larger* than int8;
BENCHMARKS.md reports what it achieves. The size varies per page; `nbytes` is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from speckv.codecs.base import (Codec, EncodedPages, PageShape, align8, pack_rows,
                                unpack_rows)
from speckv.codecs.quant import Int8Codec

_HEADER = 4
_MAX_RUN = 255


def delta_encode(codes: np.ndarray) -> np.ndarray:
    """int8 [n, ps, Hkv, D] -> uint8 [n, Hkv, D, ps]: first code, then differences mod 256."""
    c = np.ascontiguousarray(codes.view(np.uint8).transpose(0, 2, 3, 1))
    d = c.copy()
    d[..., 1:] = c[..., 1:] - c[..., :-1]  # uint8 arithmetic wraps: exact mod 256
    return d


def delta_decode(deltas: np.ndarray) -> np.ndarray:
    """Inverse of `delta_encode`."""
    c = np.cumsum(deltas, axis=-1, dtype=np.uint8)  # running sum mod 256
    return np.ascontiguousarray(c.transpose(0, 3, 1, 2)).view(np.int8)


def run_length_encode(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [n, m] -> (counts, values, runs per row): runs never cross rows, <= 255 long."""
    n, m = stream.shape
    flat = stream.reshape(-1)
    new = np.ones(flat.shape, dtype=bool)
    new[1:] = flat[1:] != flat[:-1]
    new[::m] = True
    starts = np.flatnonzero(new)
    position = np.arange(flat.size) - starts[np.cumsum(new) - 1]
    new |= position % _MAX_RUN == 0  # split long runs
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, flat.size)).astype(np.uint8)
    runs_per_row = np.bincount(starts // m, minlength=n)
    return counts, flat[starts], runs_per_row


class SeedCodec(Codec):
    """int8 (see `Int8Codec`) + modular delta + run-length; variable size, int8's error."""

    def __init__(self, shape: PageShape) -> None:
        super().__init__(shape)
        self.int8 = Int8Codec(shape)
        s = shape
        self._elems = (s.page_size, s.num_kv_heads, s.head_dim)
        self._stream = 2 * s.page_size * s.num_kv_heads * s.head_dim
        self._scale_bytes = self.int8.slot_bytes - self._stream
        # worst case: every byte its own run (two bytes)
        self._bytes = align8(_HEADER + self._scale_bytes + 2 * self._stream)

    @property
    def slot_bytes(self) -> int:
        return self._bytes

    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.int8.error_bound(k, v)  # the later stages are lossless

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedPages:
        kq, vq, ks, vs = self.int8.quantize(k, v)
        n = kq.shape[0]
        scales = pack_rows([ks, vs]).cpu().numpy()
        stream = np.concatenate([delta_encode(kq.cpu().numpy()).reshape(n, -1),
                                 delta_encode(vq.cpu().numpy()).reshape(n, -1)], axis=1)
        counts, values, runs = run_length_encode(stream)
        rows = np.zeros((n, self._bytes), dtype=np.uint8)
        nbytes = _HEADER + self._scale_bytes + 2 * runs
        rows[:, :_HEADER] = nbytes.astype("<u4").view(np.uint8).reshape(n, _HEADER)
        rows[:, _HEADER:_HEADER + self._scale_bytes] = scales
        first = np.concatenate([[0], np.cumsum(runs)])
        base = _HEADER + self._scale_bytes
        for i in range(n):
            r, a, b = runs[i], first[i], first[i + 1]
            rows[i, base:base + r] = counts[a:b]
            rows[i, base + r:base + 2 * r] = values[a:b]
        return EncodedPages(torch.from_numpy(rows).to(k.device), torch.from_numpy(nbytes.astype(np.int64)))

    def decode(self, data, out=None):
        rows = data.cpu().numpy()
        n = rows.shape[0]
        nbytes = rows[:, :_HEADER].copy().view("<u4").reshape(n).astype(np.int64)
        base = _HEADER + self._scale_bytes
        stream = np.empty((n, self._stream), dtype=np.uint8)
        for i in range(n):
            r = (nbytes[i] - base) // 2
            stream[i] = np.repeat(rows[i, base + r:base + 2 * r], rows[i, base:base + r])
        half = self._stream // 2
        shape = (n, self.shape.num_kv_heads, self.shape.head_dim, self.shape.page_size)
        kq = torch.from_numpy(delta_decode(stream[:, :half].reshape(shape)))
        vq = torch.from_numpy(delta_decode(stream[:, half:].reshape(shape)))
        ks, vs = unpack_rows(torch.from_numpy(rows[:, _HEADER:base]), self.int8.scale_specs)
        k, v = self.int8.dequantize(kq, vq, ks, vs)
        if out is None:
            return k.to(data.device), v.to(data.device)
        return out[0].copy_(k), out[1].copy_(v)
