"""Quantized weights as a GGUF file has them, and the one call that multiplies by any weight.

A `QuantWeight` is a matrix [out, in] as a GGUF file quantizes it: each row is in / 32
blocks of Q4_0, Q4_1 or Q8_0, split at load into their codes and their fp16 scales
(the layout `csrc/quant_matmul.cpp` reads; no number or byte changes). `linear(x, w)`
is `x @ w` for a dense weight ([in, out], the layout measured fastest on CPU) and the
weight-only kernel for a quantized one, whose activations stay float32: the numbers
multiplied are the checkpoint's own weights, so the quantized path and the path that
dequantizes once at load compute with the same model.

`--weight-quant`:
  auto  GGUF weights stay in their quantized formats where the kernel reads them (CPU,
        float32); other formats (K-quants, float tensors) are expanded to floats
  none  every weight expanded to `dtype` at load (the float path)
  int8  as auto, and float weights quantized to Q8_0 (symmetric, 32 per scale)
  int4  as auto, and float weights quantized to Q4_1 (asymmetric, 32 per scale and
        minimum: gpt-fast's group-wise int4 with group size 32)
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
"""Block formats the kernel multiplies by (the numbers are csrc/quant_matmul.cpp's)."""
BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # ggml's block sizes
CODE_BYTES = {"Q4_0": 16, "Q4_1": 16, "Q8_0": 32}
WEIGHT_QUANTS = ("auto", "none", "int8", "int4")
QUANTIZE_TO = {"int8": "Q8_0", "int4": "Q4_1"}


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """A weight [out_features, in_features] quantized in a GGUF format, its blocks split
    into codes and fp16 scales (csrc/quant_matmul.cpp: the same numbers and bytes)."""

    codes: torch.Tensor  # uint8 [out, in / 32 * CODE_BYTES[format]]
    scales: torch.Tensor  # float16 [out, in / 32 * (2 if Q4_1 else 1)]: every d, then every m
    format: str  # a key of FORMATS

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, format: str) -> "QuantWeight":
        """From ggml's blocks, uint8 [out, in / 32 * BLOCK_BYTES[format]]."""
        if format not in FORMATS:
            raise ValueError(f"weight format {format!r} is not one of {', '.join(FORMATS)}")
        size = BLOCK_BYTES[format]
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % size:
            raise ValueError(f"{format} blocks must be uint8 [out, k * {size}], got "
                             f"{blocks.dtype} {tuple(blocks.shape)}")
        b = blocks.reshape(blocks.shape[0], -1, size)
        d = b[..., :2].contiguous().view(torch.float16)[..., 0]  # [out, blocks]
        if format == "Q4_1":  # planar: every d of the row, then every m
            m = b[..., 2:4].contiguous().view(torch.float16)[..., 0]
            scales, codes = torch.cat([d, m], dim=1), b[..., 4:]
        else:
            scales, codes = d, b[..., 2:]
        return cls(codes.reshape(b.shape[0], -1).contiguous(), scales.contiguous(), format)

    @property
    def in_features(self) -> int:
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


Weight = torch.Tensor | QuantWeight


@functools.cache  # loading checks the build (hashes the sources): once per process
def _kernels():
    from speckv.kv.cpu_kernels import load_cpu_kernels

    return load_cpu_kernels()


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x: [T, in] -> [T, out]; w dense [in, out] or a QuantWeight [out, in]."""
    if isinstance(w, QuantWeight):
        return _kernels().quant_matmul(x, w.codes, w.scales, FORMATS[w.format])
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


def concat(weights: list[QuantWeight]) -> QuantWeight:
    """Weights of one format and input size stacked by output features (fused QKV)."""
    first = weights[0]
    if any(w.format != first.format or w.in_features != first.in_features for w in weights):
        raise ValueError("only weights of one format and input size can be fused")
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
