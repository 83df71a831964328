"""The built-in selectors: full, quest, centroid, sink_recent, oracle."""

from __future__ import annotations

import torch

from speckv.kv.attention import grouped
from speckv.selection.base import SelectionInputs, Selector, union_by_rank


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

    def page_scores(self, inputs: SelectionInputs) -> torch.Tensor:
        c = inputs.centroids()  # [B, P, Hkv, D]
        batch, num_pages, num_kv, dim = c.shape
        num_q = inputs.q.shape[1]
        q = grouped(inputs.q, num_kv).to(c.dtype)  # [B, Hkv, Q*G, D]
        est = torch.einsum("bhqd,bphd->bhqp", q, c)  # [B, Hkv, Q*G, P]
        return union_by_rank(est.view(batch, num_kv, num_q, -1, num_pages), inputs.positions,
                             inputs.page_size)


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
