"""The selector seam: page scores per (sequence, query, KV head), and the choice of pages.

A selector only scores pages (`Selector.page_scores`); `choose_pages` turns scores
into a selection under a token budget, the same way for every selector:

    forced      the query's own page (the open page while decoding) and, with
                `keep_sink`, page 0: always attended
    candidates  the sealed pages before the query's page; pages after it are
                causally invisible
    budget      ceil(budget_tokens / page_size) pages in all (forced ones included),
                at least the forced ones; the rest are the best-scored candidates

Every (sequence, query, KV head) gets its own pages; with grouped-query attention a
page's score for a KV head folds the query heads of its group: quest takes the max
(a page any of them bounds high is kept), `union_by_rank` interleaves their own
rankings (each head's best page first, then each head's second, ...). Ties between
candidates go to the older page (topk order).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from speckv.registry import Registry

NEG = float("-inf")


@dataclass(slots=True)
class SelectionInputs:
    """What a selector may look at for one layer of one step.

    q: [B, Q, H, D] queries (rotary applied); positions: [B, Q] their token positions.
    summaries(): [B, P, Hkv, 2, D] per-page key min (index 0) and max (index 1),
        valid for sealed pages only.
    keys(): [B, P * page_size, Hkv, D] every key of the listed pages (costs a full
        read: only the oracle and evaluation call it).
    centroids(): [B, P, Hkv, S, D] the mean key of each of a page's S equal slices
        (S = 1, the default: the page's mean key), valid for sealed pages only.
    """

    q: torch.Tensor
    positions: torch.Tensor
    num_pages: int
    page_size: int
    num_kv_heads: int
    summaries: Callable[[], torch.Tensor]
    keys: Callable[[], torch.Tensor]
    centroids: Callable[[], torch.Tensor] = lambda: _no_centroids()


def _no_centroids() -> torch.Tensor:
    raise RuntimeError("bug: these selection inputs carry no page centroids")


class Selector(ABC):
    """Scores the pages of a layer for each query and KV head (higher: more needed)."""

    name: str = ""
    #: reads every key (true scores): all pages must be resident first
    needs_keys: bool = False
    #: attends every page: nothing to score
    dense: bool = False
    #: a compiled kernel scores, chooses and attends in one call for this selector
    #: (`AttentionKernels.fused[name]`); its choice must equal `choose_pages(page_scores)`
    fused: bool = False
    #: slices per page its summaries must have (`SummaryStore.slices`)
    min_slices: int = 1

    @abstractmethod
    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        """-> [B, Q, Hkv, P] float scores; only candidate pages' scores matter."""


SELECTORS: Registry[type[Selector]] = Registry("selector", {
    "full": "speckv.selection.selectors:Full",
    "quest": "speckv.selection.selectors:Quest",
    "centroid": "speckv.selection.selectors:Centroid",
    "subpage": "speckv.selection.selectors:Subpage",
    "twilight": "speckv.selection.selectors:Twilight",
    "sink_recent": "speckv.selection.selectors:SinkRecent",
    "oracle": "speckv.selection.selectors:Oracle",
})
register_selector = SELECTORS.register


def union_by_rank(scores: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """Folds per-query-head scores into one score per KV head so that the top k of the
    result is the union of each head's own best pages, taken rank by rank.

    Every query head ranks the pages before the query's own (rank 0: its best; ties: the
    older page first); the pages are then ordered by (their best rank over the group,
    then their best score over the group, higher first, then the older page): a page two
    heads rank second beats a page one head ranks third, and among the pages of one rank
    the better scored comes first. The fused CPU kernel (`landmark_decode_attention`)
    orders them by the same key.

    Args:
        scores: [B, Hkv, Q, G, P] per query head (G heads share a KV head).
        positions: [B, Q] query positions (pages from the query's own on are not ranked).

    Returns:
        [B, Q, Hkv, P]: minus each page's place in that order (distinct whole numbers:
        no ties for top-k to break), -inf for the pages not ranked.
    """
    scores = scores.float()
    unseen = unseen_pages(positions, scores.shape[-1], page_size)
    scores = scores.masked_fill(unseen[:, None, :, None, :], NEG)
    rank = scores.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # 0: the head's best
    best_rank, best = rank.amin(3), scores.amax(3)  # [B, Hkv, Q, P]
    # lexicographic by stable sorts, least significant key first (the page index: as is)
    by_score = best.argsort(dim=-1, descending=True, stable=True)
    order = by_score.gather(-1, best_rank.gather(-1, by_score).argsort(dim=-1, stable=True))
    place = order.argsort(dim=-1)
    folded = -place.to(scores.dtype)
    return folded.masked_fill(best == NEG, NEG).permute(0, 2, 1, 3)


def unseen_pages(positions: torch.Tensor, num_pages: int, page_size: int) -> torch.Tensor:
    """[B, Q, P] bool: the pages a query at `positions` [B, Q] does not rank (its own
    open page and the causally invisible ones after it)."""
    page = torch.arange(num_pages, device=positions.device)
    return page >= (positions // page_size)[..., None]


def budget_tokens(budget: int | float, context_lens: torch.Tensor) -> torch.Tensor:
    """Tokens to keep for contexts of `context_lens` tokens: a fixed count, or a fraction
    of each context (rounded up)."""
    if isinstance(budget, int):
        return torch.full_like(context_lens, budget)
    return torch.ceil(context_lens.double() * budget).long()


def choose_pages(scores: torch.Tensor, positions: torch.Tensor, page_budget: torch.Tensor,
                 page_size: int, keep_sink: bool) -> torch.Tensor:
    """The selection as a page mask.

    Args:
        scores: [B, Q, Hkv, P] page scores.
        positions: [B, Q] position of each query (its page is forced, later pages are
            invisible).
        page_budget: [B, Q] pages to keep per query, forced pages included.
        keep_sink: force page 0 too.

    Returns:
        [B, Q, Hkv, P] bool: the pages each query and KV head attends.
    """
    batch, num_q, num_kv, num_pages = scores.shape
    page = torch.arange(num_pages, device=scores.device)
    own = (positions // page_size)[..., None]  # [B, Q, 1]
    forced = page == own
    candidate = page < own  # [B, Q, P]
    if keep_sink:
        forced = forced | (page == 0)
        candidate = candidate & (page > 0)
    extra = (page_budget - forced.sum(-1)).clamp(min=0)  # [B, Q] best candidates to add
    mask = forced[:, :, None, :].expand(batch, num_q, num_kv, num_pages).clone()
    k = min(int(extra.max()) if extra.numel() else 0, num_pages)
    if k == 0:
        return mask
    ranked = scores.masked_fill(~candidate[:, :, None, :], NEG)
    top = ranked.topk(k, dim=-1)  # [B, Q, Hkv, k]
    keep = (torch.arange(k, device=scores.device) < extra[:, :, None, None]) & (top.values > NEG)
    mask.scatter_(-1, top.indices, keep | mask.gather(-1, top.indices))
    return mask


def page_budget(budget: int | float, positions: torch.Tensor, page_size: int,
                min_context_tokens: int) -> torch.Tensor:
    """[B, Q] pages each query may attend: its budget in pages, rounded up (a budget of
    the whole context is every page, the open one partial), or every page when its
    context is shorter than `min_context_tokens`."""
    context = positions + 1
    pages = _all_pages(budget_tokens(budget, context), page_size)
    if min_context_tokens:
        pages = torch.where(context < min_context_tokens, _all_pages(context, page_size), pages)
    return pages


def _all_pages(context: torch.Tensor, page_size: int) -> torch.Tensor:
    return (context + page_size - 1) // page_size
