"""Quantized weights kept as GGUF blocks, and the one call that multiplies by any weight.

A `QuantWeight` is a matrix [out, in] as ggml stores it: each row is in / 32 blocks
of Q4_0, Q4_1 or Q8_0 (formats in `csrc/quant_matmul.cpp`). `linear(x, w)` is `x @ w`
for a dense weight ([in, out], the layout measured fastest on CPU) and the weight-only
kernel for a quantized one, whose activations stay float32: the numbers multiplied
are the checkpoint's own weights, so the quantized path and the path that
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

from dataclasses import dataclass

import numpy as np
import torch

FORMATS = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2}
"""Block formats the kernel multiplies by (the numbers are csrc/quant_matmul.cpp's)."""
BLOCK = 32
WEIGHT_QUANTS = ("auto", "none", "int8", "int4")
QUANTIZE_TO = {"int8": "Q8_0", "int4": "Q4_1"}


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """A weight [out_features, in_features] in GGUF blocks: uint8 [out, in / 32 * B]."""

    blocks: torch.Tensor
    format: str  # a key of FORMATS
    in_features: int

    @property
    def out_features(self) -> int:
        return self.blocks.shape[0]

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def rows(self, start: int, stop: int) -> "QuantWeight":
        """Output features [start, stop) (contiguous: whole rows of blocks)."""
        return QuantWeight(self.blocks[start:stop], self.format, self.in_features)


Weight = torch.Tensor | QuantWeight


def _kernels():
    from speckv.kv.cpu_kernels import load_cpu_kernels

    return load_cpu_kernels()


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x: [T, in] -> [T, out]; w dense [in, out] or a QuantWeight [out, in]."""
    if isinstance(w, QuantWeight):
        return _kernels().quant_matmul(x, w.blocks, FORMATS[w.format])
    return x @ w


def dequantize(w: QuantWeight, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or its `rows`) as float32 [n, in_features]."""
    if rows is None:
        rows = torch.empty(0, dtype=torch.long)
    return _kernels().dequantize_rows(w.blocks, FORMATS[w.format], rows)


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
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(blocks)), format, w.shape[-1])


def concat(weights: list[QuantWeight]) -> QuantWeight:
    """Weights of one format and input size stacked by output features (fused QKV)."""
    first = weights[0]
    if any(w.format != first.format or w.in_features != first.in_features for w in weights):
        raise ValueError("only weights of one format and input size can be fused")
    return QuantWeight(torch.cat([w.blocks for w in weights]), first.format, first.in_features)


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
    return runs and weight_quant != "none"
