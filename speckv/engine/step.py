"""One engine step, per layer: five narrow calls over one `StepMetadata`.

    cache.append(slots, k, v, sealed)       new K/V into their DEVICE slots; pages
                                            sealed this step get their summaries
    selection.select(...)                   which pages each decode query reads (none:
                                            all), or, fused, selection and attention
                                            in one kernel call
    cache.prepare_load / complete_load      where each of those pages lives: a DEVICE
                                            slot, or a pool row read in place (copy:
                                            pooled pages are fetched into DEVICE first,
                                            the prefetched ones promoted in between)
    prefetch.after_read(layer, needed)      the prefetcher's hint for what comes next
    kernels.decode / sparse_decode(...)     one attention call over that view

The step is the engine's: `speckv.kv` owns pages and their placement and knows
nothing of selection or prefetch. Decode tokens attend together and prefill chunks
together, so a batch of single-token decodes is never padded to a prompt's length;
prefill chunks stay dense unless the step asks otherwise (scoring), in which case
each query is masked to its own pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from speckv.kv.attention import NO_ROWS, AttentionKernels, paged_attention
from speckv.kv.cache import KVCacheManager, RequestId
from speckv.selection.step import StepSelection

if TYPE_CHECKING:
    from speckv.prefetch.prefetcher import Prefetcher


_UNSET = object()


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
class StepMetadata:
    """What every layer of one step needs to know, computed once for the step.

    Rows are the step's sequences, decodes first; T is the step's flat token count.
    """

    request_ids: list[RequestId]
    num_pages: int  # columns of the tables: the longest sequence's pages
    num_decode: int  # rows [0, num_decode) decode one token each
    positions: torch.Tensor  # [T] token positions
    context_lens: torch.Tensor  # [B] tokens in the cache per row, this step's included
    block_tables: torch.Tensor  # [L, B, P] page entries (DEVICE slot, or -1 - pool row)
    slot_mapping: torch.Tensor  # [L, T] DEVICE slot * page_size + offset of each new token
    built_at: int  # the cache's eviction count when the tables were stacked
    prefill: PrefillGroup | None  # the multi-token rows, padded
    summary_tables: torch.Tensor | None  # [L, B, P] summary slots, when summaries are kept
    sealed: tuple[torch.Tensor, torch.Tensor] | None  # (rows, pages) sealed this step

    @classmethod
    def build(cls, cache: KVCacheManager, chunks: list[ScheduledChunk],
              device: torch.device) -> "StepMetadata":
        """`chunks` must list single-token (decode) chunks first, in flat token order."""
        ps = cache.page_size
        context = [c.start + c.num_tokens for c in chunks]
        num_pages = -(-max(context) // ps)
        request_ids = [c.request_id for c in chunks]
        block_tables = cache.block_tables(request_ids, num_pages)
        positions = torch.cat([torch.arange(c.start, c.start + c.num_tokens)
                               for c in chunks]).to(device)
        rows = torch.repeat_interleave(torch.arange(len(chunks)),
                                       torch.tensor([c.num_tokens for c in chunks])).to(device)
        page_of_token = block_tables[:, rows, positions // ps]
        num_decode = sum(1 for c in chunks if c.num_tokens == 1)
        summary_tables = sealed = None
        if cache.summaries is not None:
            summary_tables = cache.summary_tables(request_ids, num_pages).to(device)
            sealed = _sealed_pages(chunks, ps, device)
        return cls(request_ids, num_pages, num_decode, positions,
                   torch.tensor(context, device=device), block_tables,
                   page_of_token * ps + positions % ps, cache.eviction_count,
                   _prefill_group(chunks[num_decode:], num_decode, device),
                   summary_tables, sealed)


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


def _window_pages(chunks: list[ScheduledChunk], window: int, ps: int, num_pages: int,
                  device: torch.device) -> torch.Tensor | None:
    """[B, P] bool: the pages holding a key that some query of the row sees through a
    sliding window of `window` tokens; None when no window leaves a page out."""
    if window <= 0:
        return None
    first = torch.tensor([max(0, c.start - window + 1) // ps for c in chunks])
    end = torch.tensor([-(-(c.start + c.num_tokens) // ps) for c in chunks])
    if not bool((first > 0).any()):
        return None
    page = torch.arange(num_pages)
    return ((page >= first[:, None]) & (page < end[:, None])).to(device)


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


class StepAttention:
    """The `LayerAttention` of one step: the five calls above, layer by layer."""

    def __init__(self, cache: KVCacheManager, chunks: list[ScheduledChunk],
                 device: torch.device, kernels: AttentionKernels | None = None,
                 selection: StepSelection | None = None, select_prefill: bool = False,
                 query_for: Callable | None = None,
                 prefetcher: Prefetcher | None = None, window: int = 0) -> None:
        """`chunks` must list single-token (decode) chunks first, in flat token order.

        Args:
            selection: which pages decode queries read (None: all).
            select_prefill: apply the selection to multi-token chunks too, each query
                to its own pages (scoring and evaluation; serving prefills densely).
            query_for: the model's `project_query`, for the speculative-query predictor.
            prefetcher: the engine's `speckv.prefetch.Prefetcher` (with a pool), told what
                each layer reads and handed the pages a layer must load.
            window: > 0: every query attends only the last `window` positions up to its
                own (a sliding window, as Mistral's); the pages wholly before it are
                neither loaded nor read. Dense steps only (no selection with it).
        """
        self.cache = cache
        self.kernels = kernels or AttentionKernels()
        self.in_place = cache.reads_in_place  # pool entries of the tables are read in place
        self.rows, self.row_format = (cache.store.rows(), cache.store.row_format) \
            if self.in_place else (NO_ROWS, 0)
        self.selection = selection
        self.select_prefill = select_prefill
        self.meta = m = StepMetadata.build(cache, chunks, device)
        self.positions = m.positions  # the model reads them
        self.window = window
        # [B, P] the pages in some query's window, where a window leaves pages out
        self.in_window = _window_pages(chunks, window, cache.page_size, m.num_pages, device)
        self._fused_choice = _UNSET  # once known (`_fused_budget`): (selector, budgets) or None
        self._prefetcher = prefetcher
        self.prefetch = None  # the prefetcher's view of this step, when one runs
        if prefetcher is not None and prefetcher.active:
            from speckv.prefetch.step import StepPrefetch

            self.prefetch = StepPrefetch(prefetcher, cache, m.request_ids,
                                         m.context_lens.tolist(), m.num_pages, m.num_decode,
                                         selection, m.positions, m.summary_tables, query_for)

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        """The model's hook before each layer (set when a predictor reads layer inputs)."""
        self.prefetch.layer_input(layer, x)

    def finish(self) -> None:
        """The step's forward pass is over."""
        if self.prefetch is not None:
            self.prefetch.finish()

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D] of the step's tokens -> attention output [T, H, D]."""
        m = self.meta
        sealed = None
        if m.sealed is not None and m.summary_tables is not None:
            rows, pages = m.sealed
            sealed = (m.summary_tables[layer, rows, pages], m.block_tables[layer, rows, pages])
        self.cache.append(m.slot_mapping[layer], k, v, sealed)
        sel = self.selection if self.selection is not None and self.selection.sparse(layer) \
            else None
        if sel is None:
            if self.selection is not None:  # a dense layer of a selecting step
                counted = m.positions if self.select_prefill else m.positions[:m.num_decode]
                self.selection.count_dense(layer, counted)
            return self._dense(layer, q)
        return self._sparse(layer, q, sel)

    # ------------------------------------------------------------ dense

    def _dense(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        pool, m = self.cache.pool, self.meta
        # decode tokens are the flat tokens [0, n): one query per sequence, no padding
        n, lens, needed = m.num_decode, m.context_lens, self.in_window
        tables = self._resident(layer, m.block_tables[layer], needed)
        if needed is not None:  # pages left behind by the window: never read (any slot)
            tables = torch.where(needed, tables, 0)
        if self.prefetch is not None:
            self.prefetch.after_read(layer, needed)
        started = time.perf_counter()
        if m.prefill is None:
            out = self.kernels.decode(q, pool.k_pages, pool.v_pages, tables, lens, self.rows,
                                      self.row_format, self.window)
        else:
            out = torch.empty_like(q)
            if n:
                out[:n] = self.kernels.decode(q[:n], pool.k_pages, pool.v_pages, tables[:n],
                                              lens[:n], self.rows, self.row_format, self.window)
            self._prefill(q, tables, out, None)
        self._read_in_place(tables, needed, started)
        return out

    def _prefill(self, q: torch.Tensor, tables: torch.Tensor, out: torch.Tensor,
                 page_mask: torch.Tensor | None) -> None:
        n, g = self.meta.num_decode, self.meta.prefill
        tables, first = tables[n:], 0
        if self.in_window is not None:  # the columns before every chunk's window: not listed
            first = int(self.in_window[n:].int().argmax(1).min())
            tables = tables[:, first:]
        k_pages, v_pages, listed = self._pages(tables)
        indices = torch.arange(first, first + tables.shape[1], device=tables.device)
        o = paged_attention(q[g.query_index], k_pages, v_pages, listed,
                            self.meta.context_lens[n:], g.query_positions,
                            page_indices=indices.expand(tables.shape), page_mask=page_mask,
                            window=self.window)
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
        keys = (-1 - tables[absent]).numpy()
        self.cache.store.read_in_place(keys, started)
        if self.prefetch is not None:  # hinted rows read: used
            self._prefetcher.consumed(keys)

    # ------------------------------------------------------------ sparse

    def _sparse(self, layer: int, q: torch.Tensor, sel: StepSelection) -> torch.Tensor:
        """Each query reads its selected pages; only those are fetched from the pool."""
        n, g = self.meta.num_decode, self.meta.prefill
        fused = self._fused_budget(sel)
        if fused is not None:
            return self._fused_sparse(layer, q, sel, fused)
        tables = self.meta.block_tables[layer]
        if sel.needs_keys:  # true scores read every key: everything resident first
            tables = self._resident(layer, tables, None)
        decode_mask = prefill_mask = None
        if n:
            rows = torch.arange(n)
            decode_mask = self._select(layer, sel, rows, q[:n, None], self.meta.positions[:n, None],
                                       torch.ones(n, 1, dtype=torch.bool, device=q.device), tables)
        if g is not None and self.select_prefill:
            rows = torch.arange(n, len(self.meta.request_ids))
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
            out[:n] = self._sparse_decode(q[:n], tables[:n], self.meta.context_lens[:n],
                                          decode_mask)
        if g is not None:
            self._prefill(q, tables, out, prefill_mask)
        self._read_in_place(tables, needed, started)
        return out

    def _fused_budget(self, sel: StepSelection) -> tuple[str, torch.Tensor] | None:
        """The selector and [B] page budgets of the decode rows when one kernel call can
        select and attend (a fused selector, nothing copied into DEVICE first, prefill
        chunks dense); the same for every layer of the step, so worked out once."""
        if self._fused_choice is _UNSET:
            m = self.meta
            fusable = (self.kernels.fused and m.num_decode
                       and (self.cache.store is None or self.in_place)
                       and (m.prefill is None or not self.select_prefill))
            self._fused_choice = sel.fused_budget(m.positions[:m.num_decode],
                                                  self.kernels.fused) if fusable else None
        return self._fused_choice

    def _fused_sparse(self, layer: int, q: torch.Tensor, sel: StepSelection,
                      fused: tuple[str, torch.Tensor]) -> torch.Tensor:
        """Decode rows: the selector's scores, choice and attention in one kernel call."""
        n, pool, tables = self.meta.num_decode, self.cache.pool, self.meta.block_tables[layer]
        selector, budget = fused
        started = time.perf_counter()
        out = torch.empty_like(q)
        out[:n], chosen = self.kernels.fused[selector](
            q[:n], pool.k_pages, pool.v_pages, self.cache.summaries,
            self.meta.summary_tables[layer, :n], tables[:n], self.meta.context_lens[:n], budget,
            sel.keep_sink, self.rows, self.row_format)
        decode_mask = chosen[:, None]  # [B, 1, Hkv, P]
        sel.count(layer, decode_mask, self.meta.positions[:n, None])
        if self.meta.prefill is not None:
            self._prefill(q, tables, out, None)
        if self.in_place:
            needed = self._needed(decode_mask, None)
            self._read_in_place(tables, needed, started)
            if self.prefetch is not None:  # the selection is known only now
                self.prefetch.after_read(layer, needed)
        return out

    def _select(self, layer: int, sel: StepSelection, rows: torch.Tensor, q: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        sids = self.meta.summary_tables[layer]
        cache, ps = self.cache, self.cache.page_size

        def summaries(local: torch.Tensor) -> torch.Tensor:
            return cache.summaries.gather(sids[rows[local]])

        def centroids(local: torch.Tensor) -> torch.Tensor:
            return cache.summaries.gather_centroids(sids[rows[local]])

        def keys(local: torch.Tensor) -> torch.Tensor:  # [b, P * ps, Hkv, D]
            ids = tables[rows[local]]
            k_pages, _, listed = self._pages(ids)
            k = k_pages.index_select(0, listed.reshape(-1))
            return k.view(ids.shape[0], ids.shape[1] * ps, *k.shape[2:])

        return sel.select(layer, rows, q, positions, valid, summaries, keys, self.meta.num_pages,
                          centroids)

    def _needed(self, decode_mask: torch.Tensor | None,
                prefill_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, P] pages any query of a row reads (prefill rows without a mask: all)."""
        parts = []
        if decode_mask is not None:
            parts.append(decode_mask.any(2).any(1))
        if self.meta.prefill is not None:
            if prefill_mask is None:
                rows = len(self.meta.request_ids) - self.meta.num_decode
                parts.append(torch.ones(rows, self.meta.num_pages, dtype=torch.bool,
                                        device=self.meta.context_lens.device))
            else:
                valid = self.meta.prefill.valid[:, :, None, None]
                parts.append((prefill_mask & valid).any(2).any(1))
        return torch.cat(parts)

    def _resident(self, layer: int, tables: torch.Tensor,
                  needed: torch.Tensor | None) -> torch.Tensor:
        """The pages attention will read, readable (with a pool): the cache takes DEVICE
        slots for those it must load, the prefetcher promotes the ones it holds, the cache
        fetches the rest."""
        if self.cache.store is None:
            return tables
        m = self.meta
        plan = self.cache.prepare_load(layer, m.request_ids, tables, m.built_at, needed)
        if plan.keys.size and self._prefetcher is not None:
            self._prefetcher.promote(plan)
        return self.cache.complete_load(plan)

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
