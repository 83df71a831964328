"""Quantized weights as a GGUF file has them, and the one call that multiplies by any weight.

A `QuantWeight` is a matrix [out, in] as a GGUF file quantizes it: each row is in / 32
blocks of Q4_0, Q4_1 or Q8_0, split at load into their codes and their fp16 scales
(the layout `csrc/quant_matmul.cpp` reads; no number or byte changes), or super-blocks
of 256 in the K-quants Q4_K and Q6_K, whose codes are rewritten into the same block
layouts (the same integers; Q6_K's 6-bit codes stored as int8) and whose scales are
kept as the file has them. Q5_0 (what llama.cpp's Q4_K_M falls back to for rows that
are not whole super-blocks) is held as Q8_0: its 5-bit codes as int8, the same numbers.
A fused projection whose parts differ in format is a `StackedWeight`. `linear(x, w)`
is `x @ w` for a dense weight ([in, out], the layout measured fastest on CPU) and the
weight-only kernel for a quantized one, whose activations stay float32: the numbers
multiplied are the checkpoint's own weights, so the quantized path and the path that
dequantizes once at load compute with the same model.

`--weight-quant`:
  auto  GGUF weights stay in their quantized formats where the kernel reads them (CPU,
        float32); other formats (Q5_1, Q2_K, Q3_K, Q5_K, float tensors) are expanded
  none  every weight expanded to `dtype` at load (the float path)
  int8  as auto, and float weights quantized to Q8_0 (symmetric, 32 per scale)
  int4  as auto, and float weights quantized to Q4_1 (asymmetric, 32 per scale and
        minimum: gpt-fast's group-wise int4 with group size 32)
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q6_K": 4}
"""Block formats the kernel multiplies by (the numbers are csrc/quant_matmul.cpp's)."""
BLOCK = 32
SUPER = 256  # elements per K-quant super-block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210,  # ggml's
               "Q5_0": 22}
BLOCK_ELEMENTS = {"Q4_K": SUPER, "Q6_K": SUPER}  # per block; the others BLOCK
CODE_BYTES = {"Q4_0": 16, "Q4_1": 16, "Q8_0": 32, "Q4_K": 16, "Q6_K": 32}  # per 32
HELD_AS = {"Q5_0": "Q8_0"}
"""GGUF formats held in another kernel format, the numbers unchanged."""
LOADABLE = (*FORMATS, *HELD_AS)
"""Every GGUF format a `QuantWeight` can be made from."""
WEIGHT_QUANTS = ("auto", "none", "int8", "int4")
QUANTIZE_TO = {"int8": "Q8_0", "int4": "Q4_1"}


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """A weight [out_features, in_features] quantized in a GGUF format, its blocks split
    into codes and fp16 scales (csrc/quant_matmul.cpp: the same numbers and bytes)."""

    codes: torch.Tensor  # uint8 [out, in / 32 * CODE_BYTES[format]]
    scales: torch.Tensor  # float16 [out, ...]: a row's planes (csrc/quant_matmul.cpp);
    # Q4_0, Q8_0: every d; Q4_1: every d, then every m; Q4_K: d, dmin, sc, m; Q6_K: d, sc
    format: str  # a key of FORMATS

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, format: str) -> "QuantWeight":
        """From ggml's blocks, uint8 [out, in / 32 * BLOCK_BYTES[format]] (per 256 for
        the K-quants)."""
        if format not in LOADABLE:
            raise ValueError(f"weight format {format!r} is not one of {', '.join(LOADABLE)}")
        size = BLOCK_BYTES[format]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % size:
            raise ValueError(f"{format} blocks must be uint8 [out, k * {size}], got "
                             f"{blocks.dtype} {tuple(blocks.shape)}")
        if format in BLOCK_ELEMENTS or format in HELD_AS:
            return cls(*_split_by_codes(blocks.numpy(), format), HELD_AS.get(format, format))
        b = blocks.reshape(blocks.shape[0], -1, size)
        d = b[..., :2].contiguous().view(torch.float16)[..., 0]  # [out, blocks]
        if format == "Q4_1":  # planar: every d of the row, then every m
            m = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
            scales, codes = torch.cat([d, m], dim=1), b[..., 4:]
        else:
            scales, codes = d, b[..., 2:]
        return cls(codes.reshape(b.shape[0], -1).contiguous(), scales.contiguous(), format)

    @property
    def in_features(self) -> int:  # codes hold CODE_BYTES per 32 elements in every format
        return self.codes.shape[1] // CODE_BYTES[self.format] * BLOCK

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 2

    def rows(self, start: int, stop: int) -> "QuantWeight":
        """Output features [start, stop) (contiguous: whole rows)."""
        return QuantWeight(self.codes[start:stop], self.scales[start:stop], self.format)


@dataclass(frozen=True, slots=True)
class StackedWeight:
    """Quantized weights of one input size stacked by output features, each in its own
    format: a fused projection whose parts the file quantized differently (llama.cpp's
    Q4_K_M: q and k in Q4_K, v in Q6_K in some layers). One matmul per part."""

    parts: tuple[QuantWeight, ...]

    @property
    def in_features(self) -> int:
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        return sum(p.out_features for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, start: int, stop: int) -> "QuantWeight | StackedWeight":
        """Output features [start, stop)."""
        pieces, offset = [], 0
        for p in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, p.out_features)
            if lo < hi:
                pieces.append(p.rows(lo, hi))
            offset += p.out_features
        return pieces[0] if len(pieces) == 1 else StackedWeight(tuple(pieces))


QUANTIZED = (QuantWeight, StackedWeight)
Weight = torch.Tensor | QuantWeight | StackedWeight


def _split_by_codes(blocks: np.ndarray, format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K-quant super-blocks uint8 [out, in / 256 * size] (Q5_0: blocks of 32) -> (codes,
    scales) in the kernel's layout. The bit layouts are read through gguf-py's own
    dequantization, fed copies of the blocks with unit scales: what comes out is each
    element's integer code."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[format]
    out = blocks.shape[0]
    b = blocks.reshape(out, -1, BLOCK_BYTES[format])  # [out, blocks or supers, size]

    def ints(edit) -> np.ndarray:  # [out, in]: gguf-py's values of the edited blocks
        copy = b.copy()
        edit(copy)
        return dequantize(copy.reshape(out, -1), qtype).reshape(out, -1)

    one = np.frombuffer(np.float16(1).tobytes(), np.uint8)
    if format == "Q5_0":  # d fp16, 4 bytes of high bits, 16 of low nibbles: w = (q - 16) d
        def unit(c):
            c[..., 0:2] = one

        codes = ints(unit).astype(np.int8).view(np.uint8)  # q - 16, as Q8_0 holds codes
        planes = [b[..., 0:2].copy().view(np.float16)[..., 0]]
    elif format == "Q4_K":  # d, dmin fp16; 12 bytes of 6-bit sc and m for 8 blocks; qs
        def unit(c):  # d = 1, dmin = 0, every sc = 1 and m = 0: the value is q
            c[..., 0:2], c[..., 2:4], c[..., 4:16] = one, 0, [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]

        def only_m(c, q):  # d = dmin = 1, every code q: the value is q sc - m
            c[..., 0:2], c[..., 2:4], c[..., 16:] = one, one, q

        q = ints(unit).astype(np.uint8)
        m = -ints(lambda c: only_m(c, 0))[:, ::BLOCK]
        sc = ints(lambda c: only_m(c, 0x11))[:, ::BLOCK] + m
        d = b[..., 0:2].copy().view(np.float16)[..., 0]
        dmin = b[..., 2:4].copy().view(np.float16)[..., 0]
        q = q.reshape(out, -1, 2, 16)  # per block: elements 0..15 low nibbles, 16..31 high
        codes = q[:, :, 0] | (q[:, :, 1] << 4)
        planes = [d, dmin, sc, m]
    else:  # Q6_K: ql, qh (the codes), 16 int8 scales, d fp16
        def unit(c):
            c[..., 192:208], c[..., 208:210] = 1, one

        codes = ints(unit).astype(np.int8).view(np.uint8)  # q - 32
        d = b[..., 208:210].copy().view(np.float16)[..., 0]
        planes = [d, b[..., 192:208].copy().view(np.int8).reshape(out, -1)]
    scales = np.concatenate([np.asarray(p, np.float32).reshape(out, -1) for p in planes], axis=1)
    return (torch.from_numpy(np.ascontiguousarray(codes.reshape(out, -1))),
            torch.from_numpy(scales.astype(np.float16)))


@functools.cache  # loading checks the build (hashes the sources): once per process
def _kernels():
    from speckv.kv.cpu_kernels import load_cpu_kernels

    return load_cpu_kernels()


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x: [T, in] -> [T, out]; w dense [in, out] or a quantized one [out, in]."""
    if isinstance(w, QuantWeight):
        return _kernels().quant_matmul(x, w.codes, w.scales, FORMATS[w.format])
    if isinstance(w, StackedWeight):
        return torch.cat([linear(x, p) for p in w.parts], dim=1)
    return x @ w


def dequantize(w: QuantWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or its `rows`) as float32 [n, in_features]."""
    if rows is None:
        rows = torch.empty(0, dtype=torch.long)
    return _kernels().dequantize_rows(w.codes, w.scales, FORMATS[w.format], rows)


def embedding(ids: torch.Tensor, table: Weight) -> torch.Tensor:
    """Rows `ids` of an embedding table [V, hidden], dense or quantized."""
    if isinstance(table, QuantWeight):
        return dequantize(table, ids)
    return torch.nn.functional.embedding(ids, table)


def quantize(w: torch.Tensor, format: str) -> QuantWeight:
    """A float weight [out, in] (in a multiple of 32) in `format`, as gguf-py quantizes."""
    from gguf import GGMLQuantizationType, quants

    if w.shape[-1] % BLOCK:
        raise ValueError(f"cannot quantize a weight of {w.shape[-1]} input features to "
                         f"{format}: not a multiple of {BLOCK}")
    blocks = quants.quantize(w.float().numpy(), GGMLQuantizationType[format])
    return QuantWeight.from_blocks(torch.from_numpy(np.ascontiguousarray(blocks)), format)


def concat(weights: list[QuantWeight]) -> QuantWeight | StackedWeight:
    """Weights of one input size stacked by output features (fused QKV): one weight
    where they share a format, else a `StackedWeight` of each run of one format."""
    first = weights[0]
    if any(w.in_features != first.in_features for w in weights):
        raise ValueError("only weights of one input size can be fused")
    if any(w.format != first.format for w in weights):
        runs = [list(run) for _, run in itertools.groupby(weights, key=lambda w: w.format)]
        return StackedWeight(tuple(concat(run) for run in runs))
    return QuantWeight(torch.cat([w.codes for w in weights]),
                       torch.cat([w.scales for w in weights]), first.format)


def fused_ops(device: torch.device, dtype: torch.dtype):
    """The CPU kernels' fused per-layer ops where they apply (CPU, float32), else None.
    A machine that cannot build the kernels runs torch's ops, and says so once."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    return _kernels_if_built()


@functools.cache  # one build attempt and one warning per process, not one per caller
def _kernels_if_built():
    try:
        return _kernels()
    except RuntimeError as exc:
        logger.warning("running the model with torch's ops: %s", exc)
        return None


def check_weight_quant(weight_quant: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether quantized weights are kept for this device and dtype (False: expand them).

    Raises:
        ValueError: int8 / int4 asked for where the kernel does not run.
    """
    if weight_quant not in WEIGHT_QUANTS:
        raise ValueError(f"weight_quant={weight_quant!r} is not one of {', '.join(WEIGHT_QUANTS)}")
    runs = device.type == "cpu" and dtype == torch.float32
    if weight_quant in QUANTIZE_TO and not runs:
        raise ValueError(
            f"weight_quant={weight_quant} runs on the CPU in float32 only (asked: "
            f"device={device.type}, dtype={str(dtype).removeprefix('torch.')}); use "
            "weight_quant=none there")
    if not runs or weight_quant == "none":
        return False
    if weight_quant == "auto" and fused_ops(device, dtype) is None:
        return False  # no kernel on this machine: expand the weights (warned above)
    return True
