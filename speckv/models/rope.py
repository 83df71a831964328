"""RoPE's inverse frequencies, and the scalings that stretch them to longer contexts.

Each scaling is the published definition, computed in float64 once per model:

  default  inv_freq[i] = theta^(-2i / D)
  linear   positions divided by `factor` (Chen et al., position interpolation):
           inv_freq / factor
  dynamic  NTK-aware scaling whose base grows only past the pretrained context; within
           it (and speckv's context window is `max_position_embeddings`) it is default
  llama3   Llama 3.1's: wavelengths longer than original / low_freq_factor divided by
           `factor`, shorter than original / high_freq_factor kept, the band between
           blended linearly in original / wavelength
  factors  what llama.cpp stores for llama3 in a GGUF (`rope_freqs.weight`): each
           frequency's divisor, inv_freq / factors[i]
  yarn     YaRN (Peng et al.): per-dimension blend of interpolated (/ factor) and
           extrapolated frequencies, ramped between the dimensions that turn beta_fast
           and beta_slow times over the original context; cos and sin scaled by the
           attention factor 0.1 ln(factor) + 1 (or as the config gives it)

`inv_freq(args)` returns the frequencies and the factor cos and sin are multiplied by.
"""

from __future__ import annotations

import math

import torch

from speckv.models.args import ModelArgs


def inv_freq(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """(inverse frequencies float64 [D / 2], attention scaling of cos and sin)."""
    dim, base = args.head_dim, args.rope_theta
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind in ("default", "dynamic"):
        return default, 1.0
    if kind == "factors":
        return default / torch.tensor(scaling["factors"], dtype=torch.float64), 1.0
    factor = float(scaling["factor"])
    original = int(scaling.get("original_max_position_embeddings")
                   or args.max_position_embeddings)
    if kind == "linear":
        return default / factor, 1.0
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / default
        scaled = torch.where(wavelen > original / low, default / factor, default)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled), 1.0
    if kind == "yarn":
        return _yarn(scaling, dim, base, factor, original)
    raise ValueError(f"rope scaling {kind!r} is not supported")


def _yarn(scaling: dict, dim: int, base: float, factor: float,
          original: int) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def turning_dim(rotations: float) -> float:  # the dim that turns `rotations` times
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = turning_dim(beta_fast), turning_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the share of the extrapolated (unscaled) frequency
    freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return (1 / (factor * freqs)) * (1 - keep) + (1 / freqs) * keep, float(attention)
