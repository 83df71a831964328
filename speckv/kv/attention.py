"""Attention over paged KV: the one function through which every layer reads the cache.

`paged_attention` reads the pages listed in a block table. It takes the logical
index of each listed page, so a caller can pass any subset of a sequence's pages
(query-aware selection) and the causal mask still uses true token positions.

`StepAttention` binds one engine step: it knows, for each flattened token, its
sequence, its position and its cache slot in every layer, appends the new K/V, and
attends in groups (decode tokens together, prefill chunks together) so that a
batch of single-token decodes is never padded to a prompt's length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from speckv.kv.cache import KVCacheManager, RequestId


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
    keys = k_pages[block_table].view(batch, num_listed * page_size, num_kv_heads, head_dim)
    values = v_pages[block_table].view(batch, num_listed * page_size, num_kv_heads, head_dim)
    if page_indices is None:
        page_indices = torch.arange(num_listed, device=q.device).expand(batch, num_listed)
    offsets = torch.arange(page_size, device=q.device)
    key_pos = (page_indices[:, :, None] * page_size + offsets).view(batch, 1, -1)  # [B, 1, L]
    mask = (key_pos <= query_positions[:, :, None]) & (key_pos < context_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], enable_gqa=num_heads != num_kv_heads)  # [B, H, Q, D]
    return out.transpose(1, 2)


@dataclass(slots=True)
class AttentionGroup:
    """Sequences attended together, their queries padded to the longest in the group."""

    rows: slice  # rows of the step's batch (index into the stacked block tables)
    query_index: torch.Tensor  # [B, Q] flat token index of each query (padding: 0)
    query_positions: torch.Tensor  # [B, Q]
    valid: torch.Tensor | None  # [B, Q] bool, None when no query is padding


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's tokens in a step: positions [start, start + num_tokens)."""

    request_id: RequestId
    start: int
    num_tokens: int


class StepAttention:
    """The `LayerAttention` of one step: append K/V to the paged cache, then attend."""

    def __init__(self, cache: KVCacheManager, chunks: list[ScheduledChunk],
                 device: torch.device) -> None:
        """`chunks` must list single-token (decode) chunks first, in flat token order."""
        self.cache = cache
        ps = cache.page_size
        context = [c.start + c.num_tokens for c in chunks]
        num_pages = -(-max(context) // ps)
        self.block_tables = cache.block_tables([c.request_id for c in chunks], num_pages)
        self.context_lens = torch.tensor(context, device=device)
        positions = torch.cat([torch.arange(c.start, c.start + c.num_tokens) for c in chunks])
        self.positions = positions.to(device)
        rows = torch.repeat_interleave(torch.arange(len(chunks)),
                                       torch.tensor([c.num_tokens for c in chunks])).to(device)
        # slot of every token in every layer: [num_layers, T]
        page_of_token = self.block_tables[:, rows, self.positions // ps]
        self.slot_mapping = page_of_token * ps + self.positions % ps
        self.groups = self._groups(chunks, device)

    @staticmethod
    def _groups(chunks: list[ScheduledChunk], device: torch.device) -> list[AttentionGroup]:
        num_decode = sum(1 for c in chunks if c.num_tokens == 1)
        if any(c.num_tokens == 1 for c in chunks[num_decode:]):
            raise RuntimeError("bug: decode chunks must come first in a step")
        groups = []
        if num_decode:
            index = torch.arange(num_decode, device=device)[:, None]
            starts = torch.tensor([c.start for c in chunks[:num_decode]], device=device)
            groups.append(AttentionGroup(slice(0, num_decode), index, starts[:, None], None))
        prefill = chunks[num_decode:]
        if prefill:
            width = max(c.num_tokens for c in prefill)
            lens = torch.tensor([c.num_tokens for c in prefill])
            first = torch.cumsum(lens, 0) - lens + num_decode
            cols = torch.arange(width)
            valid = cols[None, :] < lens[:, None]
            index = torch.where(valid, first[:, None] + cols, 0)
            starts = torch.tensor([c.start for c in prefill])
            groups.append(AttentionGroup(
                slice(num_decode, len(chunks)), index.to(device),
                (starts[:, None] + cols).to(device), valid.to(device)))
        return groups

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        pool = self.cache.pool
        slots = self.slot_mapping[layer]
        pool.k_pages.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        pool.v_pages.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
        out = torch.empty_like(q)
        for g in self.groups:
            o = paged_attention(q[g.query_index], pool.k_pages, pool.v_pages,
                                self.block_tables[layer, g.rows], self.context_lens[g.rows],
                                g.query_positions)
            if g.valid is None:
                out[g.query_index[:, 0]] = o[:, 0]
            else:
                out[g.query_index[g.valid]] = o[g.valid]
        return out
