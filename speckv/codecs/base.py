"""The codec seam: how a KV page is encoded for the POOL tier and decoded back.

A codec turns a batch of pages into fixed-width byte rows, one row per page, so a
pool can keep pages in one arena of equal slots and move a whole batch with one
gather. A row holds the encoded page and, for codecs whose size depends on the
data, a 4-byte header with the page's encoded length: ``nbytes`` is always the
exact number of meaningful bytes in the row (scales and zero points included),
and it is what the engine accounts and what a link model charges.

    k, v: [n, page_size, num_kv_heads, head_dim] (the device dtype)
        │ encode                                   ▲ decode
        ▼                                          │
    EncodedPages(data uint8 [n, slot_bytes], nbytes int64 [n])

A new codec is one subclass plus one line in `CODECS`; `make_codec("int8+zstd")`
builds a codec with an optional lossless stage on top.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from speckv.registry import Registry


@dataclass(frozen=True, slots=True)
class PageShape:
    """What one page holds: K and V of `page_size` tokens for every KV head."""

    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def raw_bytes(self) -> int:
        """Bytes of one page in the device dtype (what codec `none` stores)."""
        return 2 * self.page_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.page_size * self.num_kv_heads * self.head_dim * 2


@dataclass(slots=True)
class EncodedPages:
    """Encoded pages: row i of `data` holds page i; its first `nbytes[i]` bytes matter."""

    data: torch.Tensor  # uint8 [n, slot_bytes]
    nbytes: torch.Tensor  # int64 [n], on the CPU

    def __len__(self) -> int:
        return self.data.shape[0]


class Codec(ABC):
    """Encodes pages for the pool. Subclasses document their error bound.

    Attributes:
        name: the registry name.
        slot_bytes: the width of an encoded row, an upper bound of any page's size.
        lossless: True when decode(encode(x)) == x exactly.
    """

    name: str = ""
    lossless: bool = False

    def __init__(self, shape: PageShape) -> None:
        self.shape = shape

    @property
    def row_format(self) -> str | None:
        """The row format (`speckv.kv.cpu_kernels.FORMATS`) in which the CPU kernels read
        this codec's rows where they lie -- decoding them as they stream, exactly as
        `decode` does -- or None: the rows are only read through `decode` (the torch path).
        """
        return None

    @property
    @abstractmethod
    def slot_bytes(self) -> int: ...

    @abstractmethod
    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedPages:
        """k, v: [n, page_size, Hkv, D] in the device dtype -> n encoded rows."""

    @abstractmethod
    def decode(self, data: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """data: uint8 [n, >= slot_bytes] (rows from `encode`) -> k, v [n, page_size, Hkv, D]
        in the device dtype, on `data`'s device.

        `out`, when given, is a pair of such tensors that a codec may decode into (a
        caller's reusable buffers: fresh large tensors cost page faults on every
        fetch). The result may also be views of `data` (codec `none`).
        """

    @abstractmethod
    def error_bound(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codec's stated bound: per element, the most |x - decode(encode(x))| can be
        for these pages (same shapes as k and v)."""

    def describe(self) -> str:
        return f"{self.name}: {self.slot_bytes} bytes/page slot, raw {self.shape.raw_bytes}"


CODECS: Registry[type[Codec]] = Registry("codec", {
    "none": "speckv.codecs.quant:NoneCodec",
    "fp16": "speckv.codecs.quant:Fp16Codec",
    "bf16": "speckv.codecs.quant:Bf16Codec",
    "int8": "speckv.codecs.quant:Int8Codec",
    "kivi4": "speckv.codecs.kivi:Kivi4Codec",
    "kivi2": "speckv.codecs.kivi:Kivi2Codec",
    "seed": "speckv.codecs.seed:SeedCodec",
})
STAGES: Registry[Callable[[Codec], Codec]] = Registry("codec stage", {
    "zstd": "speckv.codecs.zstd:ZstdStage",  # a lossless stage on top of any codec
})
register_codec = CODECS.register


def known_codecs() -> list[str]:
    return CODECS.names() + [f"<codec>+{s}" for s in STAGES.names()]


def validate_codec_name(spec: str) -> None:
    """Raises ValueError, listing the known codecs, unless `spec` names a codec."""
    base, *stages = spec.split("+")
    if base not in CODECS or len(stages) > 1 or any(s not in STAGES for s in stages):
        raise ValueError(f"unknown codec {spec!r}; known codecs: {', '.join(known_codecs())}")


def make_codec(spec: str, shape: PageShape) -> Codec:
    """Builds the codec named `spec`: a registered name, optionally `+stage` (`int8+zstd`)."""
    validate_codec_name(spec)
    base, *stages = spec.split("+")
    codec = CODECS.get(base)(shape)
    for stage in stages:
        codec = STAGES.get(stage)(codec)
    return codec


# ---------------------------------------------------------------- row packing

def align8(num_bytes: int) -> int:
    """Row widths are multiples of 8 so that rows can be viewed as any dtype in place."""
    return -(-num_bytes // 8) * 8


def pack_rows(parts: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """Concatenates per-page tensors [n, ...] of any dtype into uint8 rows [n, width]."""
    n = parts[0].shape[0]
    flat = [p.contiguous().view(n, -1).view(torch.uint8) for p in parts]
    rows = torch.cat(flat, dim=1)
    if width is not None and rows.shape[1] < width:
        rows = torch.nn.functional.pad(rows, (0, width - rows.shape[1]))
    return rows


def unpack_rows(data: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """Inverse of `pack_rows`: splits rows [n, >=total] into tensors [n, *shape] of each dtype
    (views of `data` where its row width and the part's offset allow, copies otherwise)."""
    n, width = data.shape
    out, offset = [], 0
    for dtype, shape in specs:
        size = dtype.itemsize
        count = size
        for s in shape:
            count *= s
        if width % size == 0 and offset % size == 0 and data.stride(1) == 1:
            part = data.view(dtype)[:, offset // size:(offset + count) // size]
        else:
            part = data[:, offset:offset + count].contiguous().view(dtype)
        out.append(part.view(n, *shape))
        offset += count
    return out
