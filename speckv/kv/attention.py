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

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from speckv.kv.cache import KVCacheManager, RequestId
from speckv.selection.selectors import grouped
from speckv.selection.step import StepSelection

NO_ROWS = torch.empty(0, 0, dtype=torch.uint8)
"""The `rows` of a step without pool rows to read in place."""

DecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, block_table [B, P], context_lens [B], rows, row_format)
-> [B, H, D]: single-token queries attending the first context_lens[b] tokens of their
listed pages. An entry < 0 names pool row -entry - 1 of `rows` (uint8 [N, W], in
`row_format`), read in place; only the CPU kernels take such entries."""

SparseDecodeAttention = Callable[..., torch.Tensor]
"""(q [B, H, D], k_pages, v_pages, head_tables [B, Hkv, K], selected_lens [B], rows,
row_format) -> [B, H, D]: each KV head's queries attend the first selected_lens[b] tokens
of its own listed pages (pages in token order; only the last may be partial; entries
past them are never read)."""

FusedQuestAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(q [B, H, D], k_pages, v_pages, summaries [S, Hkv, 2, D], summary_table [B, P],
block_table [B, P], context_lens [B], page_budget [B], keep_sink, rows, row_format)
-> (out [B, H, D], selected [B, Hkv, P] bool): quest's selection and the sparse
attention over it in one call (TinyServe's fused kernel)."""

GatherPages = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""(k_pages, v_pages, rows, row_format, entries [n]) -> k, v [n, page_size, Hkv, D]: the
listed pages, pool rows decoded (for prefill chunks and key-reading selectors)."""


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
                           block_table: torch.Tensor, context_lens: torch.Tensor,
                           rows: torch.Tensor = NO_ROWS, row_format: int = 0) -> torch.Tensor:
    """`DecodeAttention` through `paged_attention` (any device and dtype; DEVICE pages only)."""
    positions = (context_lens - 1)[:, None]
    return paged_attention(q[:, None], k_pages, v_pages, block_table, context_lens, positions)[:, 0]


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


def cpu_kernel_quest_attention(kernels) -> FusedQuestAttention:
    """`FusedQuestAttention` by the compiled CPU kernel (float32), pages read where they lie."""

    def attend(q, k_pages, v_pages, summaries, summary_table, block_table, context_lens,
               page_budget, keep_sink, rows=NO_ROWS, row_format=0):
        return tuple(kernels.quest_decode_attention(
            q, k_pages, v_pages, summaries, summary_table, block_table, context_lens,
            page_budget, keep_sink, q.shape[-1] ** -0.5, rows, row_format))

    return attend


def cpu_kernel_decode_attention(kernels) -> DecodeAttention:
    """`DecodeAttention` by the compiled CPU kernel (float32), pages read where they lie."""

    def attend(q, k_pages, v_pages, block_table, context_lens, rows=NO_ROWS, row_format=0):
        return kernels.paged_decode_attention(q, k_pages, v_pages, block_table, context_lens,
                                              q.shape[-1] ** -0.5, rows, row_format)

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
    gather: GatherPages = torch_gather_pages
    quest: FusedQuestAttention | None = None  # quest fused with attention, where compiled


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
        self.in_place = cache.reads_in_place  # pool entries of the tables are read in place
        self.rows, self.row_format = (cache.store.rows(), cache.store.row_format) \
            if self.in_place else (NO_ROWS, 0)
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
        started = time.perf_counter()
        if self.prefill is None:
            out = self.kernels.decode(q, pool.k_pages, pool.v_pages, tables, lens, self.rows,
                                      self.row_format)
        else:
            out = torch.empty_like(q)
            if n:
                out[:n] = self.kernels.decode(q[:n], pool.k_pages, pool.v_pages, tables[:n],
                                              lens[:n], self.rows, self.row_format)
            self._prefill(q, tables, out, None)
        self._read_in_place(tables, None, started)
        return out

    def _prefill(self, q: torch.Tensor, tables: torch.Tensor, out: torch.Tensor,
                 page_mask: torch.Tensor | None) -> None:
        n, g = self.num_decode, self.prefill
        k_pages, v_pages, listed = self._pages(tables[n:])
        o = paged_attention(q[g.query_index], k_pages, v_pages, listed,
                            self.context_lens[n:], g.query_positions, page_mask=page_mask)
        out[g.query_index[g.valid]] = o[g.valid]

    def _pages(self, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_pages, v_pages, block table) through which torch code reads `tables`' pages:
        DEVICE's own, or, with pool rows in the tables, the pages decoded into fresh
        tensors (a prefill chunk's compute dwarfs that copy)."""
        pool = self.cache.pool
        if not self.in_place or not bool((tables < 0).any()):
            return pool.k_pages, pool.v_pages, tables
        k, v = self.kernels.gather(pool.k_pages, pool.v_pages, self.rows, self.row_format,
                                   tables.reshape(-1))
        return k, v, torch.arange(tables.numel(), device=tables.device).view_as(tables)

    def _read_in_place(self, tables: torch.Tensor, needed: torch.Tensor | None,
                       started: float) -> None:
        """Accounts the pool rows attention read where they lie (`needed`: the pages a
        selection read; default all listed), link model included."""
        if not self.in_place:
            return
        absent = tables < 0
        if needed is not None:
            absent &= needed
        self.cache.store.read_in_place((-1 - tables[absent]).numpy(), started)

    # ------------------------------------------------------------ sparse

    def _sparse(self, layer: int, q: torch.Tensor, sel: StepSelection) -> torch.Tensor:
        """Each query reads its selected pages; only those are fetched from the pool."""
        n, g = self.num_decode, self.prefill
        budget = self._fused_budget(sel)
        if budget is not None:
            return self._fused_sparse(layer, q, sel, budget)
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
        needed = None
        if self.cache.store is not None:
            needed = self._needed(decode_mask, prefill_mask)
            tables = self._resident(layer, tables, needed)
            if self.prefetch is not None:
                self.prefetch.after_read(layer, needed)
        started = time.perf_counter()
        out = torch.empty_like(q)
        if n:
            out[:n] = self._sparse_decode(q[:n], tables[:n], self.context_lens[:n], decode_mask)
        if g is not None:
            self._prefill(q, tables, out, prefill_mask)
        self._read_in_place(tables, needed, started)
        return out

    def _fused_budget(self, sel: StepSelection) -> torch.Tensor | None:
        """[B] page budgets of the decode rows when one kernel call can select and attend
        (a fused selector, nothing copied into DEVICE first, prefill chunks dense)."""
        if (self.kernels.quest is None or not self.num_decode
                or (self.cache.store is not None and not self.in_place)
                or (self.prefill is not None and self.select_prefill)):
            return None
        return sel.fused_budget(self.positions[:self.num_decode])

    def _fused_sparse(self, layer: int, q: torch.Tensor, sel: StepSelection,
                      budget: torch.Tensor) -> torch.Tensor:
        """Decode rows: quest's scores, top-k and attention in one kernel call."""
        n, pool, tables = self.num_decode, self.cache.pool, self.block_tables[layer]
        started = time.perf_counter()
        out = torch.empty_like(q)
        out[:n], chosen = self.kernels.quest(
            q[:n], pool.k_pages, pool.v_pages, self.cache.summaries.data,
            self.summary_tables[layer, :n], tables[:n], self.context_lens[:n], budget,
            sel.keep_sink, self.rows, self.row_format)
        decode_mask = chosen[:, None]  # [B, 1, Hkv, P]
        sel.count(layer, decode_mask, self.positions[:n, None])
        if self.prefill is not None:
            self._prefill(q, tables, out, None)
        if self.cache.store is not None:
            self._read_in_place(tables, self._needed(decode_mask, None), started)
        return out

    def _select(self, layer: int, sel: StepSelection, rows: torch.Tensor, q: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        sids = self.summary_tables[layer]
        cache, ps = self.cache, self.cache.page_size

        def summaries(local: torch.Tensor) -> torch.Tensor:
            return cache.summaries.gather(sids[rows[local]])

        def keys(local: torch.Tensor) -> torch.Tensor:  # [b, P * ps, Hkv, D]
            ids = tables[rows[local]]
            k_pages, _, listed = self._pages(ids)
            k = k_pages.index_select(0, listed.reshape(-1))
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
        last_page = (lens - 1) // ps  # always selected: it is the largest index
        selected_lens = (count - 1) * ps + (lens - last_page * ps)
        pool = self.cache.pool
        return self.kernels.sparse_decode(q, pool.k_pages, pool.v_pages, head_tables, selected_lens,
                                          self.rows, self.row_format)
