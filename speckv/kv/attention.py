"""Attention over paged KV: the one function through which every layer reads the cache.

`paged_attention` reads the pages listed in a block table. It takes the logical
index of each listed page, so a caller can pass any subset of a sequence's pages
(query-aware selection) and the causal mask still uses true token positions.

`StepAttention` binds one engine step: it knows, for each flattened token, its
sequence, its position and its cache slot in every layer, appends the new K/V,
summarizes the pages it seals, and attends in two groups (decode tokens together,
prefill chunks together) so that a batch of single-token decodes is never padded to
a prompt's length. With a page selection (`speckv.selection`), decode tokens read
only their selected pages, per KV head (`SparseDecodeAttention`), and pages that no
query selected are never fetched from the pool; prefill chunks stay dense unless the
step asks otherwise (scoring), in which case each query is masked to its own pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from speckv.kv.cache import KVCacheManager, RequestId
from speckv.selection.selectors import grouped
from speckv.selection.step import StepSelection

DecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, block_table [B, P], context_lens [B]) -> [B, H, D]:
single-token queries attending the first context_lens[b] tokens of their listed pages."""

SparseDecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, head_tables [B, Hkv, K], selected_lens [B]) -> [B, H, D]:
each KV head's queries attend the first selected_lens[b] tokens of its own listed pages
(pages in token order; only the last may be partial)."""


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_table: torch.Tensor, context_lens: torch.Tensor,
                    query_positions: torch.Tensor,
                    page_indices: torch.Tensor | None = None,
                    page_mask: torch.Tensor | None = None) -> torch.Tensor:
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
                           block_table: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """`DecodeAttention` through `paged_attention` (any device and dtype)."""
    positions = (context_lens - 1)[:, None]
    return paged_attention(q[:, None], k_pages, v_pages, block_table, context_lens, positions)[:, 0]


def torch_sparse_decode_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                                  head_tables: torch.Tensor, selected_lens: torch.Tensor) -> torch.Tensor:
    """`SparseDecodeAttention` by a gather of each KV head's pages, then SDPA (any device)."""
    batch, num_heads, dim = q.shape
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


def cpu_kernel_sparse_decode_attention(kernels) -> SparseDecodeAttention:
    """`SparseDecodeAttention` by the compiled CPU kernel (float32), pages read in place."""

    def attend(q, k_pages, v_pages, head_tables, selected_lens):
        return kernels.sparse_decode_attention(q, k_pages, v_pages, head_tables, selected_lens,
                                               q.shape[-1] ** -0.5)

    return attend


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


@dataclass(slots=True)
class AttentionKernels:
    """The attention functions a step uses (torch, or the compiled CPU kernels)."""

    decode: DecodeAttention = torch_decode_attention
    sparse_decode: SparseDecodeAttention = torch_sparse_decode_attention


class StepAttention:
    """The `LayerAttention` of one step: append K/V to the paged cache, then attend."""

    def __init__(self, cache: KVCacheManager, chunks: list[ScheduledChunk],
                 device: torch.device, kernels: AttentionKernels | None = None,
                 selection: StepSelection | None = None, select_prefill: bool = False,
                 query_for: Callable | None = None) -> None:
        """`chunks` must list single-token (decode) chunks first, in flat token order.

        Args:
            selection: which pages decode queries read (None: all).
            select_prefill: apply the selection to multi-token chunks too, each query
                to its own pages (scoring and evaluation; serving prefills densely).
            query_for: the model's `project_query`, for the speculative-query predictor.
        """
        self.cache = cache
        self.kernels = kernels or AttentionKernels()
        self.selection = selection
        self.select_prefill = select_prefill
        ps = cache.page_size
        context = [c.start + c.num_tokens for c in chunks]
        self.num_pages = -(-max(context) // ps)
        self.request_ids = [c.request_id for c in chunks]
        self.block_tables = cache.block_tables(self.request_ids, self.num_pages)
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
        self.summary_tables = None  # [L, B, P] summary slots, when summaries are kept
        if cache.summaries is not None:
            self.summary_tables = cache.summary_tables(self.request_ids, self.num_pages).to(device)
            self.sealed = self._sealed_pages(chunks, ps, device)
        self.prefetch = None  # the prefetcher's view of this step, when one runs
        if cache.prefetcher is not None and cache.prefetcher.active:
            from speckv.prefetch.step import StepPrefetch

            self.prefetch = StepPrefetch(cache, self.request_ids, context, self.num_pages,
                                         self.num_decode, selection, self.positions,
                                         self.summary_tables, query_for)

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        """The model's hook before each layer (set when a predictor reads layer inputs)."""
        self.prefetch.layer_input(layer, x)

    def finish(self) -> None:
        """The step's forward pass is over."""
        if self.prefetch is not None:
            self.prefetch.finish()

    @staticmethod
    def _sealed_pages(chunks: list[ScheduledChunk], ps: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, logical pages) of the pages this step fills: they get summaries."""
        rows, pages = [], []
        for row, c in enumerate(chunks):
            first, end = c.start // ps, (c.start + c.num_tokens) // ps  # pages full after
            rows.extend([row] * (end - first))
            pages.extend(range(first, end))
        if not rows:
            return None
        return torch.tensor(rows, device=device), torch.tensor(pages, device=device)

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
        if self.summary_tables is not None and self.sealed is not None:
            rows, pages = self.sealed
            self.cache.summaries.summarize(self.summary_tables[layer, rows, pages],
                                           pool.k_pages[self.block_tables[layer, rows, pages]])
        sel = self.selection if self.selection is not None and self.selection.sparse(layer) \
            else None
        if sel is None:
            if self.selection is not None:  # a dense layer of a selecting step
                counted = self.positions if self.select_prefill else self.positions[:self.num_decode]
                self.selection.count_dense(layer, counted)
            return self._dense(layer, q)
        return self._sparse(layer, q, sel)

    # ------------------------------------------------------------ dense

    def _dense(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        pool = self.cache.pool
        # decode tokens are the flat tokens [0, n): one query per sequence, no padding
        n, tables, lens = self.num_decode, self.block_tables[layer], self.context_lens
        if self.cache.store is not None:  # attention reads DEVICE only: fetch what is missing
            tables = self.cache.ensure_resident(layer, self.request_ids, tables, self._built_at)
            if self.prefetch is not None:
                self.prefetch.after_read(layer, None)
        if self.prefill is None:
            return self.kernels.decode(q, pool.k_pages, pool.v_pages, tables, lens)
        out = torch.empty_like(q)
        if n:
            out[:n] = self.kernels.decode(q[:n], pool.k_pages, pool.v_pages, tables[:n], lens[:n])
        self._prefill(q, tables, out, None)
        return out

    def _prefill(self, q: torch.Tensor, tables: torch.Tensor, out: torch.Tensor,
                 page_mask: torch.Tensor | None) -> None:
        pool, n, g = self.cache.pool, self.num_decode, self.prefill
        o = paged_attention(q[g.query_index], pool.k_pages, pool.v_pages, tables[n:],
                            self.context_lens[n:], g.query_positions, page_mask=page_mask)
        out[g.query_index[g.valid]] = o[g.valid]

    # ------------------------------------------------------------ sparse

    def _sparse(self, layer: int, q: torch.Tensor, sel: StepSelection) -> torch.Tensor:
        """Each query reads its selected pages; only those are fetched from the pool."""
        n, g = self.num_decode, self.prefill
        tables = self.block_tables[layer]
        if sel.needs_keys:  # true scores read every key: everything resident first
            tables = self._resident(layer, tables, None)
        decode_mask = prefill_mask = None
        if n:
            rows = torch.arange(n)
            decode_mask = self._select(layer, sel, rows, q[:n, None], self.positions[:n, None],
                                       torch.ones(n, 1, dtype=torch.bool, device=q.device), tables)
        if g is not None and self.select_prefill:
            rows = torch.arange(n, len(self.request_ids))
            prefill_mask = self._select(layer, sel, rows, q[g.query_index], g.query_positions,
                                        g.valid, tables)
        if self.cache.store is not None:
            needed = self._needed(decode_mask, prefill_mask)
            tables = self._resident(layer, tables, needed)
            if self.prefetch is not None:
                self.prefetch.after_read(layer, needed)
        out = torch.empty_like(q)
        if n:
            out[:n] = self._sparse_decode(q[:n], tables[:n], self.context_lens[:n], decode_mask)
        if g is not None:
            self._prefill(q, tables, out, prefill_mask)
        return out

    def _select(self, layer: int, sel: StepSelection, rows: torch.Tensor, q: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        sids = self.summary_tables[layer]
        cache, ps = self.cache, self.cache.page_size

        def summaries(local: torch.Tensor) -> torch.Tensor:
            return cache.summaries.gather(sids[rows[local]])

        def keys(local: torch.Tensor) -> torch.Tensor:  # [b, P * ps, Hkv, D]
            ids = tables[rows[local]]
            k = cache.pool.k_pages.index_select(0, ids.reshape(-1))
            return k.view(ids.shape[0], ids.shape[1] * ps, *k.shape[2:])

        return sel.select(layer, rows, q, positions, valid, summaries, keys, self.num_pages)

    def _needed(self, decode_mask: torch.Tensor | None,
                prefill_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, P] pages any query of a row reads (prefill rows without a mask: all)."""
        parts = []
        if decode_mask is not None:
            parts.append(decode_mask.any(2).any(1))
        if self.prefill is not None:
            if prefill_mask is None:
                rows = len(self.request_ids) - self.num_decode
                parts.append(torch.ones(rows, self.num_pages, dtype=torch.bool,
                                        device=self.context_lens.device))
            else:
                valid = self.prefill.valid[:, :, None, None]
                parts.append((prefill_mask & valid).any(2).any(1))
        return torch.cat(parts)

    def _resident(self, layer: int, tables: torch.Tensor, needed: torch.Tensor | None) -> torch.Tensor:
        if self.cache.store is None:
            return tables
        return self.cache.ensure_resident(layer, self.request_ids, tables, self._built_at, needed)

    def _sparse_decode(self, q: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        """q: [B, H, D]; mask: [B, 1, Hkv, P] -> [B, H, D]."""
        ps = self.cache.page_size
        mask = mask[:, 0]  # [B, Hkv, P]
        num_pages = mask.shape[-1]
        count = mask[:, 0].sum(-1)  # [B] pages per KV head (equal across heads)
        width = int(count.max())
        page = torch.arange(num_pages, device=mask.device)
        # selected pages first, in token order; padding past `count` is never read
        logical = torch.where(mask, page, num_pages).sort(-1).values[..., :width]
        logical = logical.clamp(max=num_pages - 1)
        head_tables = tables.gather(1, logical.reshape(len(tables), -1)).view_as(logical)
        head_tables = head_tables.clamp(min=0)  # padding may name an evicted page (-1)
        last_page = (lens - 1) // ps  # always selected: it is the largest index
        selected_lens = (count - 1) * ps + (lens - last_page * ps)
        pool = self.cache.pool
        return self.kernels.sparse_decode(q, pool.k_pages, pool.v_pages, head_tables, selected_lens)
