"""The built-in selectors: full, quest, centroid, subpage, twilight, sink_recent, oracle."""

from __future__ import annotations

import torch

from speckv.kv.attention import grouped
from speckv.selection.base import NEG, SelectionInputs, Selector, union_by_rank, unseen_pages


class Full(Selector):
    """Every page (dense attention)."""

    dense = True

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        raise RuntimeError("bug: the full selector scores nothing")


class Quest(Selector):
    """Quest / TinyServe: the upper bound of q.k over a page from its key bounding box,

        score(q, page) = sum_i max(q_i * min_i, q_i * max_i) = q+ . max + q- . min

    with q+ = max(q, 0) and q- = min(q, 0): per KV head one batched matmul of the
    summaries' [min | max] rows with [q- | q+], read where they lie (no [.., P, D]
    temporary, no copy of the summaries; measured 4x faster than two matmuls over
    permuted summaries). The CPU kernels fuse this score, the top-k and the sparse
    attention into one call per layer (`quest_decode_attention`).
    """

    fused = True

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        s = inputs.summaries()  # [B, P, Hkv, 2, D]
        batch, num_pages, num_kv, _, dim = s.shape
        num_q = inputs.q.shape[1]
        q = grouped(inputs.q, num_kv).to(s.dtype)  # [B, Hkv, Q*G, D]
        q = torch.cat([q.clamp(max=0), q.clamp(min=0)], dim=-1)  # pairs with [min | max]
        rows = s.view(batch, num_pages, num_kv, 2 * dim)
        bound = torch.stack([torch.bmm(rows[:, :, h], q[:, h].transpose(1, 2))
                             for h in range(num_kv)], dim=1)  # [B, Hkv, P, Q*G]
        bound = bound.view(batch, num_kv, num_pages, num_q, -1).amax(-1)  # [B, Hkv, P, Q]
        return bound.permute(0, 3, 1, 2)


class Centroid(Selector):
    """Landmarks (ShadowKV's chunk-mean keys), each query head ranking for itself:

        estimate(q, page) = q . mean(keys of the page) = mean over the page of q . k

    exactly the page's mean attention logit (times sqrt(D)), from one stored row per
    page and KV head (half a quest box). It is an estimate, not a bound: a page whose
    one key matches q strongly among unrelated ones is diluted by 1/page_size (it
    never exceeds the page's max logit; tests/test_selection.py checks both on real
    keys). The query heads of a GQA group are folded by `union_by_rank`: every head
    gets its best pages in turn instead of one max over the group, which lets a
    retrieval head keep the page only it attends to.

    Recommended sparse selector (BENCHMARKS.md F12, passkey at 8k: 95% with 128 tokens,
    100% with 256, where quest gets 45% / 55%, and 60% with 512 in F3); `full` stays
    the default since selection is lossy.
    """

    fused = True  # CPU: `landmark_decode_attention`, the mean of the slices' estimates

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        return union_by_rank(centroid_logits(inputs), inputs.positions, inputs.page_size)


class Subpage(Selector):
    """Sub-page landmarks: a page's score for a query head is its best slice's,

        estimate(q, page) = max over slices s of q . mean(keys of s)

    from the `summary_slices` mean keys stored per page and KV head (4 slices of 4
    tokens at 16-token pages: 4 rows, twice a quest box). A key that matches q among
    unrelated ones is diluted by 1/slice_size instead of 1/page_size, so a page holding
    one of several similar needles (multi-key retrieval) is told apart by the slice that
    holds its key. Still an estimate: above the page's mean logit, never above its max
    (tests check both on real keys). Folded over a GQA group by `union_by_rank`, as
    `centroid`.
    """

    min_slices = 2
    fused = True  # CPU: `landmark_decode_attention`, the best of the slices' estimates

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        return union_by_rank(slice_logits(inputs).amax(-1), inputs.positions, inputs.page_size)


class Twilight(Selector):
    """An adaptive budget (Twilight's top-p) over the centroid estimate: each query head
    takes pages in order of their estimated share of its attention mass until the
    shares reach `top_p`; a KV head reads the union of its query heads' pages, ranked
    as `centroid` ranks them, and the token budget is the cap. A step whose query
    attends a few pages reads a few; one that spreads its attention reads up to the cap.

    The share is softmax over the candidate pages of q.c / sqrt(D), the page's mean
    logit: by Jensen exp(mean) <= mean(exp), so a page with one strong key among weak
    ones is underestimated, the estimate is flatter than the true mass, and top-p takes
    more pages than the true mass would need (it errs towards reading more; tests
    measure the estimate against the true per-page mass on real keys).
    """

    top_p: float = 0.9

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        logits = centroid_logits(inputs)  # [B, Hkv, Q, G, P]
        ranked = union_by_rank(logits, inputs.positions, inputs.page_size)
        if self.top_p >= 1:  # every page wanted: the budget alone decides, as centroid
            return ranked
        unseen = unseen_pages(inputs.positions, logits.shape[-1], inputs.page_size)
        unseen = unseen[:, None, :, None, :]  # [B, 1, Q, 1, P]
        share = estimated_page_shares(logits, unseen, inputs.q.shape[-1])
        ordered, order = share.sort(dim=-1, descending=True, stable=True)
        before = ordered.cumsum(-1) - ordered  # mass of the pages ranked above
        taken = torch.zeros_like(share, dtype=torch.bool).scatter_(-1, order, before < self.top_p)
        wanted = (taken & ~unseen).any(3).permute(0, 2, 1, 3)  # [B, Q, Hkv, P]
        return ranked.masked_fill(~wanted, NEG)


def centroid_logits(inputs: SelectionInputs) -> torch.Tensor:
    """[B, Hkv, Q, G, P]: q . c of every query head and page centroid (unscaled): the
    mean of the slices' estimates (equal slices: q . the page's mean key)."""
    return slice_logits(inputs).mean(-1)


def slice_logits(inputs: SelectionInputs) -> torch.Tensor:
    """[B, Hkv, Q, G, P, S]: q . c of every query head and slice centroid (unscaled)."""
    c = inputs.centroids()  # [B, P, Hkv, S, D]
    batch, num_pages, num_kv, num_slices, dim = c.shape
    num_q = inputs.q.shape[1]
    q = grouped(inputs.q, num_kv).to(c.dtype)  # [B, Hkv, Q*G, D]
    rows = c.permute(0, 2, 3, 1, 4).reshape(batch, num_kv, num_slices * num_pages, dim)
    est = q @ rows.transpose(-1, -2)  # [B, Hkv, Q*G, S*P]
    return est.view(batch, num_kv, num_q, -1, num_slices, num_pages).transpose(-1, -2)


def estimated_page_shares(logits: torch.Tensor, unseen: torch.Tensor, dim: int) -> torch.Tensor:
    """Each page's estimated share of a query head's attention mass over the pages it
    may rank: softmax of `centroid_logits` / sqrt(D) over the pages not `unseen`
    (every page holds page_size keys: that factor cancels), 0 for the unseen."""
    scaled = (logits.float() * dim ** -0.5).masked_fill(unseen, float("-inf"))
    share = scaled.softmax(-1)
    return share.nan_to_num(0.0)  # a query with no candidate page: no shares


class SinkRecent(Selector):
    """StreamingLLM: the most recent pages (with `keep_sink`, the first page too)."""

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        batch, num_q = inputs.positions.shape
        page = torch.arange(inputs.num_pages, device=inputs.q.device, dtype=torch.float32)
        return page.expand(batch, num_q, inputs.num_kv_heads, inputs.num_pages)


class Oracle(Selector):
    """The true best pages: each page's share of the full softmax attention mass, summed
    over the query heads of the group. Reads every key; for evaluation only."""

    needs_keys = True

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        return page_attention_mass(inputs).sum(3).transpose(1, 2)


def page_attention_mass(inputs: SelectionInputs) -> torch.Tensor:
    """[B, Hkv, Q, G, P]: the full causal softmax attention of each query head, summed per page."""
    keys = inputs.keys()  # [B, L, Hkv, D]
    batch, length, num_kv, dim = keys.shape
    num_q = inputs.q.shape[1]
    q = grouped(inputs.q, num_kv).to(keys.dtype)  # [B, Hkv, Q*G, D]
    logits = (q @ keys.permute(0, 2, 3, 1)) * dim ** -0.5  # [B, Hkv, Q*G, L]
    group = q.shape[2] // num_q
    visible = torch.arange(length, device=keys.device) <= inputs.positions[:, :, None]  # [B, Q, L]
    visible = visible[:, None, :, None, :].expand(batch, 1, num_q, group, length)
    logits = logits.view(batch, num_kv, num_q, group, length).masked_fill(~visible, float("-inf"))
    probs = logits.softmax(-1)
    return probs.view(batch, num_kv, num_q, group, inputs.num_pages, inputs.page_size).sum(-1)
