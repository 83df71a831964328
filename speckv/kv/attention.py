"""Attention over paged KV: the one function through which every layer reads the cache.

`paged_attention` reads the pages listed in a block table. It takes the logical
index of each listed page, so a caller can pass any subset of a sequence's pages
(query-aware selection) and the causal mask still uses true token positions.

`StepAttention` binds one engine step: it knows, for each flattened token, its
sequence, its position and its cache slot in every layer, appends the new K/V, and
attends in two groups (decode tokens together, prefill chunks together) so that a
batch of single-token decodes is never padded to a prompt's length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from speckv.kv.cache import KVCacheManager, RequestId

DecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, block_table [B, P], context_lens [B]) -> [B, H, D]:
single-token queries attending the first context_lens[b] tokens of their listed pages."""


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_table: torch.Tensor, context_lens: torch.Tensor,
                    query_positions: torch.Tensor,
                    page_indices: torch.Tensor | None = None) -> torch.Tensor:
    """Causal grouped-query attention of padded queries over a batch's pages.

    Args:
        q: [B, Q, H, D] queries (rows past a sequence's query length are padding).
        k_pages, v_pages: [num_pages, page_size, Hkv, D] page pools.
        block_table: [B, P] physical page ids to read (padding: any valid id).
        context_lens: [B] tokens in the cache per sequence, this step's included.
        query_positions: [B, Q] token position of each query.
        page_indices: [B, P] logical page index of each listed page; default 0..P-1.

    Returns:
        [B, Q, H, D] attention output.
    """
    batch, num_q, num_heads, head_dim = q.shape
    num_listed = block_table.shape[1]
    page_size, num_kv_heads = k_pages.shape[1], k_pages.shape[2]
    group = num_heads // num_kv_heads
    length = num_listed * page_size
    # index_select is ~3x faster than advanced indexing for this gather on CPU
    flat = block_table.reshape(-1)
    keys = k_pages.index_select(0, flat).view(batch, length, num_kv_heads, head_dim)
    values = v_pages.index_select(0, flat).view(batch, length, num_kv_heads, head_dim)
    if page_indices is None:
        page_indices = torch.arange(num_listed, device=q.device).expand(batch, num_listed)
    offsets = torch.arange(page_size, device=q.device)
    key_pos = (page_indices[:, :, None] * page_size + offsets).view(batch, 1, length)
    mask = (key_pos <= query_positions[:, :, None]) & (key_pos < context_lens[:, None, None])
    # GQA without repeating K/V: the G query heads of a KV head become G query rows.
    # q: [B, Q, Hkv, G, D] -> [B, Hkv, Q*G, D]; mask: [B, Q, L] -> [B, 1, Q*G, L]
    q = q.view(batch, num_q, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    q = q.reshape(batch, num_kv_heads, num_q * group, head_dim)
    mask = mask[:, :, None, :].expand(batch, num_q, group, length).reshape(batch, 1, num_q * group, length)
    out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask)  # [B, Hkv, Q*G, D]
    out = out.view(batch, num_kv_heads, num_q, group, head_dim).permute(0, 2, 1, 3, 4)
    return out.reshape(batch, num_q, num_heads, head_dim)


def torch_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """`DecodeAttention` through `paged_attention` (any device and dtype)."""
    positions = (context_lens - 1)[:, None]
    return paged_attention(q[:, None], k_pages, v_pages, block_table, context_lens, positions)[:, 0]


def cpu_kernel_decode_attention(kernels) -> DecodeAttention:
    """`DecodeAttention` by the compiled CPU kernel (float32), which reads pages in place."""

    def attend(q, k_pages, v_pages, block_table, context_lens):
        return kernels.paged_decode_attention(q, k_pages, v_pages, block_table, context_lens,
                                              q.shape[-1] ** -0.5)

    return attend


@dataclass(slots=True)
class PrefillGroup:
    """The step's multi-token chunks, their queries padded to the longest chunk."""

    query_index: torch.Tensor  # [B, Q] flat token index of each query (padding: 0)
    query_positions: torch.Tensor  # [B, Q]
    valid: torch.Tensor  # [B, Q] bool, False for padding


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's tokens in a step: positions [start, start + num_tokens)."""

    request_id: RequestId
    start: int
    num_tokens: int


class StepAttention:
    """The `LayerAttention` of one step: append K/V to the paged cache, then attend."""

    def __init__(self, cache: KVCacheManager, chunks: list[ScheduledChunk],
                 device: torch.device, decode_attention: DecodeAttention = torch_decode_attention) -> None:
        """`chunks` must list single-token (decode) chunks first, in flat token order."""
        self.cache = cache
        self.decode_attention = decode_attention
        ps = cache.page_size
        context = [c.start + c.num_tokens for c in chunks]
        num_pages = -(-max(context) // ps)
        self.request_ids = [c.request_id for c in chunks]
        self.block_tables = cache.block_tables(self.request_ids, num_pages)
        self._built_at = cache.eviction_count
        self.context_lens = torch.tensor(context, device=device)
        positions = torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in chunks])
        self.positions = positions.to(device)
        rows = torch.repeat_interleave(torch.arange(len(chunks)),
                                       torch.tensor([c.num_tokens for c in chunks])).to(device)
        # slot of every token in every layer: [num_layers, T]
        page_of_token = self.block_tables[:, rows, self.positions // ps]
        self.slot_mapping = page_of_token * ps + self.positions % ps
        self.num_decode = sum(1 for c in chunks if c.num_tokens == 1)
        self.prefill = self._prefill_group(chunks[self.num_decode:], self.num_decode, device)

    @staticmethod
    def _prefill_group(prefill: list[ScheduledChunk], first_token: int,
                       device: torch.device) -> PrefillGroup | None:
        if not prefill:
            return None
        if any(c.num_tokens == 1 for c in prefill):
            raise RuntimeError("bug: decode chunks must come first in a step")
        width = max(c.num_tokens for c in prefill)
        lens = torch.tensor([c.num_tokens for c in prefill])
        first = torch.cumsum(lens, 0) - lens + first_token
        cols = torch.arange(width)
        valid = cols[None, :] < lens[:, None]
        index = torch.where(valid, first[:, None] + cols, 0)
        starts = torch.tensor([c.start for c in prefill])
        return PrefillGroup(index.to(device), (starts[:, None] + cols).to(device), valid.to(device))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.cache.pool
        slots = self.slot_mapping[layer]
        pool.k_pages.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        pool.v_pages.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
        # decode tokens are the flat tokens [0, n): one query per sequence, no padding
        n, tables, lens = self.num_decode, self.block_tables[layer], self.context_lens
        if self.cache.store is not None:  # attention reads DEVICE only: fetch what is missing
            tables = self.cache.ensure_resident(layer, self.request_ids, tables, self._built_at)
        if self.prefill is None:
            return self.decode_attention(q, pool.k_pages, pool.v_pages, tables, lens)
        out = torch.empty_like(q)
        if n:
            out[:n] = self.decode_attention(q[:n], pool.k_pages, pool.v_pages, tables[:n], lens[:n])
        g = self.prefill
        o = paged_attention(q[g.query_index], pool.k_pages, pool.v_pages, tables[n:], lens[n:],
                            g.query_positions)
        out[g.query_index[g.valid]] = o[g.valid]
        return out
