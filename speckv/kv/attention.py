"""Attention over paged KV: the functions through which every layer reads the cache.

`paged_attention` reads the pages listed in a block table. It takes the logical
index of each listed page, so a caller can pass any subset of a sequence's pages
(query-aware selection) and the causal mask still uses true token positions.
The decode functions (`DecodeAttention`, `SparseDecodeAttention`, the fused quest
kernel) come in a torch form (any device) and a compiled CPU form that reads every
page where it lies, a DEVICE slot or a pool row. `AttentionKernels` bundles the
ones a step uses. The step itself (append, select, make readable, hint, attend) is
the engine's: `speckv.engine.step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

NO_ROWS = torch.empty(0, 0, dtype=torch.uint8)
"""The `rows` of a step without pool rows to read in place."""

DecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, block_table [B, P], context_lens [B], rows, row_format,
window) -> [B, H, D]: single-token queries attending the first context_lens[b] tokens of
their listed pages, or with window > 0 only the last `window` of them (a sliding window:
the pages wholly before it are never read). An entry < 0 names pool row -entry - 1 of
`rows` (uint8 [N, W], in `row_format`), read in place; only the CPU kernels take such
entries."""

SparseDecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, head_tables [B, Hkv, K], selected_lens [B], rows,
row_format) -> [B, H, D]: each KV head's queries attend the first selected_lens[b] tokens
of its own listed pages (pages in token order; only the last may be partial; entries
past them are never read)."""

FusedSelectAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(q [B, H, D], k_pages, v_pages, summaries (the `SummaryStore`), summary_table [B, P],
block_table [B, P], context_lens [B], page_budget [B], keep_sink, rows, row_format)
-> (out [B, H, D], selected [B, Hkv, P] bool): one selector's choice of pages and the
sparse attention over it in one call (TinyServe's fused kernel); the choice equals
`choose_pages(selector.page_scores(...))`."""

GatherPages = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(k_pages, v_pages, rows, row_format, entries [n]) -> k, v [n, page_size, Hkv, D]: the
listed pages, pool rows decoded (for prefill chunks and key-reading selectors)."""


def grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, Q, H, D] -> [B, Hkv, Q*G, D]: the G query heads of a KV head as rows."""
    batch, num_q, num_heads, dim = q.shape
    group = num_heads // num_kv_heads
    q = q.view(batch, num_q, num_kv_heads, group, dim).permute(0, 2, 1, 3, 4)
    return q.reshape(batch, num_kv_heads, num_q * group, dim)


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_table: torch.Tensor, context_lens: torch.Tensor,
                    query_positions: torch.Tensor,
                    page_indices: torch.Tensor | None = None,
                    page_mask: torch.Tensor | None = None, window: int = 0) -> torch.Tensor:
    """Causal grouped-query attention of padded queries over a batch's pages.

    Args:
        q: [B, Q, H, D] queries (rows past a sequence's query length are padding).
        k_pages, v_pages: [num_pages, page_size, Hkv, D] page pools.
        block_table: [B, P] physical page ids to read (padding: any valid id).
        context_lens: [B] tokens in the cache per sequence, this step's included.
        query_positions: [B, Q] token position of each query.
        page_indices: [B, P] logical page index of each listed page; default 0..P-1.
        page_mask: [B, Q, Hkv, P] bool, the listed pages each query and KV head may read
            (a selection: the softmax runs over those keys only); default all.
        window: > 0: each query attends only the last `window` positions up to its own
            (a sliding window, as Mistral's: key j visible to query i iff i - window < j).

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
    if window > 0:
        mask &= key_pos > query_positions[:, :, None] - window
    # GQA without repeating K/V: the G query heads of a KV head become G query rows.
    # q: [B, Q, H, D] -> [B, Hkv, Q*G, D]; mask: [B, Q, L] -> [B, 1, Q*G, L]
    q = grouped(q, num_kv_heads)
    heads = 1
    if page_mask is not None:  # [B, Q, Hkv, P] -> per-token, per-head mask [B, Hkv, Q, L]
        heads = num_kv_heads
        per_token = page_mask.permute(0, 2, 1, 3).repeat_interleave(page_size, dim=-1)
        mask = mask[:, None] & per_token
    mask = mask.view(batch, heads, num_q, 1, length).expand(batch, heads, num_q, group, length)
    mask = mask.reshape(batch, heads, num_q * group, length)
    out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask)  # [B, Hkv, Q*G, D]
    out = out.view(batch, num_kv_heads, num_q, group, head_dim).permute(0, 2, 1, 3, 4)
    return out.reshape(batch, num_q, num_heads, head_dim)


def torch_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           block_table: torch.Tensor, context_lens: torch.Tensor,
                           rows: torch.Tensor = NO_ROWS, row_format: int = 0,
                           window: int = 0) -> torch.Tensor:
    """`DecodeAttention` through `paged_attention` (any device and dtype; DEVICE pages only)."""
    positions = (context_lens - 1)[:, None]
    return paged_attention(q[:, None], k_pages, v_pages, block_table, context_lens, positions,
                           window=window)[:, 0]


def torch_sparse_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                                  head_tables: torch.Tensor, selected_lens: torch.Tensor,
                                  rows: torch.Tensor = NO_ROWS, row_format: int = 0) -> torch.Tensor:
    """`SparseDecodeAttention` by a gather of each KV head's pages, then SDPA (any device;
    DEVICE pages only)."""
    batch, num_heads, dim = q.shape
    head_tables = head_tables.clamp(min=0)  # entries past selected_lens may name pool rows
    _, page_size, num_kv, _ = k_pages.shape
    num_listed = head_tables.shape[2]
    # flat row of (page, token, head) in a [N * ps * Hkv, D] view: [B, Hkv, K, ps]
    token = torch.arange(page_size, device=q.device)
    head = torch.arange(num_kv, device=q.device)[None, :, None, None]
    rows = (head_tables[..., None] * page_size + token) * num_kv + head
    keys = k_pages.reshape(-1, dim).index_select(0, rows.reshape(-1))
    values = v_pages.reshape(-1, dim).index_select(0, rows.reshape(-1))
    length = num_listed * page_size
    keys = keys.view(batch, num_kv, length, dim)
    values = values.view(batch, num_kv, length, dim)
    mask = (torch.arange(length, device=q.device) < selected_lens[:, None]).view(batch, 1, 1, length)
    out = F.scaled_dot_product_attention(q.view(batch, num_kv, num_heads // num_kv, dim), keys,
                                         values, attn_mask=mask)  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, dim)


def torch_gather_pages(k_pages: torch.Tensor, v_pages: torch.Tensor, rows: torch.Tensor,
                       row_format: int, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`GatherPages` of DEVICE pages (any device)."""
    return k_pages.index_select(0, entries), v_pages.index_select(0, entries)


def cpu_kernel_sparse_decode_attention(kernels) -> SparseDecodeAttention:
    """`SparseDecodeAttention` by the compiled CPU kernel (float32), pages read where they lie."""

    def attend(q, k_pages, v_pages, head_tables, selected_lens, rows=NO_ROWS, row_format=0):
        return kernels.sparse_decode_attention(q, k_pages, v_pages, head_tables, selected_lens,
                                               q.shape[-1] ** -0.5, rows, row_format)

    return attend


def cpu_kernel_fused_attention(kernels) -> dict[str, FusedSelectAttention]:
    """`FusedSelectAttention` by the compiled CPU kernels (float32), pages read where they
    lie, by selector name: quest (key bounds), centroid and subpage (slice mean keys,
    their mean or best, folded as `union_by_rank`)."""

    def quest(q, k_pages, v_pages, summaries, summary_table, block_table, context_lens,
              page_budget, keep_sink, rows=NO_ROWS, row_format=0):
        return tuple(kernels.quest_decode_attention(
            q, k_pages, v_pages, summaries.data, summary_table, block_table, context_lens,
            page_budget, keep_sink, q.shape[-1] ** -0.5, rows, row_format))

    def landmarks(best_slice: bool) -> FusedSelectAttention:
        def attend(q, k_pages, v_pages, summaries, summary_table, block_table, context_lens,
                   page_budget, keep_sink, rows=NO_ROWS, row_format=0):
            return tuple(kernels.landmark_decode_attention(
                q, k_pages, v_pages, summaries.centroids, summary_table, block_table,
                context_lens, page_budget, keep_sink, best_slice, q.shape[-1] ** -0.5, rows,
                row_format))
        return attend

    return {"quest": quest, "centroid": landmarks(False), "subpage": landmarks(True)}


def cpu_kernel_decode_attention(kernels) -> DecodeAttention:
    """`DecodeAttention` by the compiled CPU kernel (float32), pages read where they lie."""

    def attend(q, k_pages, v_pages, block_table, context_lens, rows=NO_ROWS, row_format=0,
               window=0):
        return kernels.paged_decode_attention(q, k_pages, v_pages, block_table, context_lens,
                                              q.shape[-1] ** -0.5, rows, row_format, window)

    return attend


@dataclass(slots=True)
class AttentionKernels:
    """The attention functions a step uses (torch, or the compiled CPU kernels)."""

    decode: DecodeAttention = torch_decode_attention
    sparse_decode: SparseDecodeAttention = torch_sparse_decode_attention
    gather: GatherPages = torch_gather_pages
    #: selector name -> its choice fused with attention, where compiled
    fused: dict[str, FusedSelectAttention] = field(default_factory=dict)


