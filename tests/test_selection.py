"""Page selection (F3): the Quest bound, the choice of pages, sparse attention, and the
engine: identity with dense attention where the selection covers everything, fewer
pool fetches where it does not, and clear errors."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_no_leak
from speckv import SamplingParams
from speckv.bench.common import bench_text
from speckv.kv.attention import NO_ROWS, paged_attention, torch_sparse_decode_attention
from speckv.kv.summaries import SummaryStore
from speckv.selection.base import (SELECTORS, SelectionInputs, choose_pages, union_by_rank,
                                   unseen_pages)
from speckv.selection.selectors import (Centroid, Oracle, Quest, Subpage, Twilight,
                                        centroid_logits, estimated_page_shares,
                                        page_attention_mass, slice_logits)

PS = 16


def inputs_for(q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
               slices: int = 1) -> SelectionInputs:
    """Selection inputs for dense keys [B, L, Hkv, D] (L a multiple of PS), with the mean
    keys of `slices` equal slices per page."""
    batch, length, num_kv, dim = keys.shape
    pages = keys.view(batch, length // PS, PS, num_kv, dim)
    lo, hi = pages.amin(2), pages.amax(2)
    means = pages.view(batch, length // PS, slices, PS // slices, num_kv, dim).mean(3)
    return SelectionInputs(q, positions, length // PS, PS, num_kv,
                           lambda: torch.stack([lo, hi], dim=3), lambda: keys,
                           lambda: means.transpose(2, 3))  # [B, P, Hkv, S, D]


def brute_page_max(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """max over a page's keys of q.k, max over the group: [B, Q, Hkv, P], by loops."""
    batch, num_q, num_heads, _ = q.shape
    _, length, num_kv, _ = keys.shape
    group = num_heads // num_kv
    out = torch.full((batch, num_q, num_kv, length // PS), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for i in range(num_q):
            for h in range(num_heads):
                for p in range(length // PS):
                    page = keys[b, p * PS:(p + 1) * PS, h // group].double()
                    best = (page @ q[b, i, h].double()).max()
                    out[b, i, h // group, p] = max(out[b, i, h // group, p], best)
    return out


def real_qk(loaded, text: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary queries and keys of `layer` for a text, from the bundled model."""
    model, args = loaded.model, loaded.args
    ids = torch.tensor(loaded.tokenizer.encode(text))[:256]
    captured = {}

    def attention(i, q, k, v):
        if i == layer:
            captured["q"], captured["k"] = q.clone(), k.clone()
        group = args.num_heads // args.num_kv_heads
        kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), is_causal=True).transpose(0, 1)

    with torch.inference_mode():
        model.forward(ids, torch.arange(len(ids)), attention)
    return captured["q"], captured["k"]


# ---------------------------------------------------------------- the bound


@pytest.mark.parametrize("seed", [0, 1])
def test_quest_bound_is_an_upper_bound_on_random_keys(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 6, 8, generator=g)  # B=2, Q=3, H=6 (G=3), D=8
    keys = torch.randn(2, 5 * PS, 2, 8, generator=g) * torch.linspace(0.1, 3, 8)
    positions = torch.full((2, 3), 5 * PS - 1)
    bound = Quest().page_scores(inputs_for(q, keys, positions)).double()
    exact = brute_page_max(q, keys)
    assert (bound >= exact - 1e-5).all()
    assert (bound - exact).abs().max() > 1e-3  # a bound, not the exact maximum


def test_quest_bound_is_an_upper_bound_on_real_keys(loaded):
    for layer in (2, 15, 29):
        q, k = real_qk(loaded, bench_text(), layer)  # [T, H, D], [T, Hkv, D]
        inputs = inputs_for(q[None, -4:], k[None], torch.full((1, 4), k.shape[0] - 1))
        bound = Quest().page_scores(inputs).double()
        exact = brute_page_max(q[None, -4:], k[None])
        assert (bound >= exact - 1e-4).all(), f"layer {layer}"


# ---------------------------------------------------------------- the centroid estimate


def brute_page_logits(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q.k of every query head and key: [B, Q, H, P, PS], float64."""
    batch, length, num_kv, dim = keys.shape
    group = q.shape[2] // num_kv
    k = keys.double().repeat_interleave(group, 2).view(batch, length // PS, PS, -1, dim)
    return torch.einsum("bqhd,bpthd->bqhpt", q.double(), k)


def test_centroid_estimate_is_the_mean_logit_and_below_the_max_on_real_keys(loaded):
    """The estimate's definition checked per query head (mean of q.k over the page), and
    its error against the page's max logit (what retrieval needs) measured and bounded:
    mean <= max always; the gap is what the estimate gives up."""
    for layer in (2, 15, 29):
        q, k = real_qk(loaded, bench_text(), layer)  # [T, H, D], [T, Hkv, D]
        q, k = q[None, -4:], k[None]
        num_kv = k.shape[2]
        logits = brute_page_logits(q, k)  # [1, 4, H, P, PS]
        c = k.view(1, -1, PS, num_kv, k.shape[-1]).mean(2)  # [1, P, Hkv, D]
        est = torch.einsum("bqhd,bphd->bqhp", q.double(),
                           c.double().repeat_interleave(q.shape[2] // num_kv, 2))
        torch.testing.assert_close(est, logits.mean(-1), rtol=1e-6, atol=1e-4)
        gap = logits.amax(-1) - est
        assert (gap >= -1e-4).all() and gap.max() > 0, f"layer {layer}"


def test_subpage_estimate_lies_between_the_page_mean_and_max_logit_on_real_keys(loaded):
    """The best slice's mean logit, checked per query head against brute force on the
    bundled model's keys: never below the page's mean logit (the slices average to it),
    never above its max (each slice's mean is at most its max), and with 4-token slices
    it closes a measured share of the mean-to-max gap that `centroid` leaves."""
    for layer in (2, 15, 29):
        q, k = real_qk(loaded, bench_text(), layer)
        q, k = q[None, -4:], k[None]
        positions = torch.full((1, 4), k.shape[1])  # every page is a candidate
        logits = brute_page_logits(q, k)  # [1, 4, H, P, PS]
        est = slice_logits(inputs_for(q, k, positions, slices=4)).amax(-1)  # [1, Hkv, 4, G, P]
        est = est.permute(0, 2, 1, 3, 4).reshape(logits.shape[:-1]).double()
        slices = logits.view(*logits.shape[:-1], 4, PS // 4).mean(-1).amax(-1)
        torch.testing.assert_close(est, slices, rtol=1e-5, atol=1e-4)
        mean, top = logits.mean(-1), logits.amax(-1)
        assert (est >= mean - 1e-4).all() and (est <= top + 1e-4).all(), f"layer {layer}"
        closed = ((est - mean) / (top - mean).clamp(min=1e-6)).median()
        assert 0.1 < closed < 0.9, f"layer {layer}: {closed:.2f} of the gap closed"


def test_subpage_tells_apart_pages_whose_means_tie():
    """Six candidate pages with the same mean key; page 4's first slice points along q
    and its other slices away: centroid cannot tell the pages apart (ties go to the older
    page), subpage picks page 4."""
    dim = 8
    q = torch.zeros(1, 1, 3, dim)
    q[..., 0] = 1.0  # 3 query heads on one KV head, all along channel 0
    keys = torch.zeros(1, 8 * PS, 1, dim)
    keys[0, :, 0, 1] = 1.0
    needle = keys[0, 4 * PS:5 * PS, 0]
    needle[:4, 0], needle[4:, 0] = 3.0, -1.0  # mean 0 on channel 0, as every page
    positions = torch.tensor([[8 * PS - 1]])  # own page 7, sink 0, candidates 1..6
    budget = torch.tensor([[3]])  # sink + own + one
    picked = {}
    for name, selector in (("centroid", Centroid()), ("subpage", Subpage())):
        scores = selector.page_scores(inputs_for(q, keys, positions, slices=4))
        mask = choose_pages(scores, positions, budget, PS, keep_sink=True)
        picked[name] = mask[0, 0, 0].nonzero().flatten().tolist()
    assert picked == {"centroid": [0, 1, 7], "subpage": [0, 4, 7]}


@pytest.mark.parametrize("name, slices, dim, ties", [
    ("centroid", 1, 16, False), ("centroid", 4, 16, False), ("subpage", 4, 16, False),
    ("centroid", 1, 64, False), ("subpage", 4, 64, False), ("centroid", 1, 64, True),
    ("subpage", 4, 64, True)])
def test_fused_landmark_kernel_chooses_as_the_selector_and_attends_as_the_sparse_path(
        name, slices, dim, ties):
    """`landmark_decode_attention` (CPU) against the torch path on random pages: the same
    pages chosen for every sequence and KV head (union_by_rank's order, exactly), and the
    output of the sparse kernel over them (head dim 64: the 16-pages-at-a-time path).
    With `ties`, keys in {-1, 0, 1} and queries in {-2..2}: estimates are exact in any
    order of summation, many equal (zeros of either sign among them), so the tie-breaks
    (older page; +0 == -0) are what decides."""
    from speckv.kv.attention import cpu_kernel_fused_attention
    from speckv.kv.cpu_kernels import load_cpu_kernels

    kernels = load_cpu_kernels()
    g = torch.Generator().manual_seed(11)
    batch, num_pages, num_kv, group = 3, 40, 2, 3
    k_pages = torch.randn(batch * num_pages, PS, num_kv, dim, generator=g)
    if ties:
        k_pages = torch.randint(-1, 2, k_pages.shape, generator=g).float()
    v_pages = torch.randn_like(k_pages)
    store = SummaryStore(batch * num_pages, num_kv, dim, dtype=torch.float32,
                         device=torch.device("cpu"), slices=slices)
    slots = torch.as_tensor(store.allocate(batch * num_pages))
    perm = torch.randperm(batch * num_pages, generator=g)  # pages and summaries anywhere
    store.summarize(slots[perm], k_pages)
    block_table = torch.arange(batch * num_pages).view(batch, num_pages)
    summary_table = slots[perm].view(batch, num_pages)
    lens = torch.tensor([40 * PS, 23 * PS + 5, 7 * PS - 2])
    q = torch.randn(batch, num_kv * group, dim, generator=g)
    if ties:
        q = torch.randint(-2, 3, q.shape, generator=g).float()
    positions = (lens - 1)[:, None]
    budget = torch.tensor([9, 5, 4])
    out, chosen = cpu_kernel_fused_attention(kernels)[name](
        q, k_pages, v_pages, store, summary_table, block_table, lens, budget, True)
    inputs = SelectionInputs(q[:, None], positions, num_pages, PS, num_kv,
                             lambda: store.gather(summary_table), lambda: None,
                             lambda: store.gather_centroids(summary_table))
    want = choose_pages(SELECTORS.get(name)().page_scores(inputs), positions, budget[:, None],
                        PS, keep_sink=True)[:, 0]  # [B, Hkv, P]
    assert torch.equal(chosen, want)
    count = want.sum(-1)  # [B, Hkv]
    logical = torch.where(want, torch.arange(num_pages), num_pages).sort(-1).values
    head_tables = block_table.gather(1, logical.clamp(max=num_pages - 1).view(batch, -1))
    own = (lens - 1) // PS
    sel_lens = (count.amax(1) - 1) * PS + (lens - own * PS)
    assert (count == count[:, :1]).all()  # every KV head reads `budget` pages
    ref = torch_sparse_decode_attention(q, k_pages, v_pages,
                                        head_tables.view(batch, num_kv, -1), sel_lens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_union_by_rank_gives_every_query_head_its_best_pages_in_turn():
    # one KV head, 3 query heads, 6 pages, query on page 5 (pages 0-4 rankable)
    per_head = torch.tensor([[9., 8., 0., 0., 0., 7.],   # head 0: pages 0, 1
                             [0., 0., 5., 4., 0., 0.],   # head 1: pages 2, 3
                             [1., 2., 3., 4., 6., 0.]])  # head 2: pages 4, 3
    scores = per_head.view(1, 1, 1, 3, 6)
    positions = torch.tensor([[5 * PS]])
    folded = union_by_rank(scores, positions, PS)  # [1, 1, 1, 6]
    assert folded[0, 0, 0, 5] == float("-inf")  # the query's own page is not ranked
    order = folded[0, 0, 0, :5].argsort(descending=True).tolist()
    # rank 0 of each head (0, 4, 2 by their best score 9, 6, 5), then rank 1 (1: 8, 3: 4)
    assert order == [0, 4, 2, 1, 3]
    # the max over the group would have chosen 0, 1 first: head 1's page 2 waits
    assert per_head.amax(0)[:5].argsort(descending=True).tolist()[:2] == [0, 1]


def test_centroid_selector_ranks_by_its_estimate_and_keeps_the_budget():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, 6, 8, generator=g)
    keys = torch.randn(1, 8 * PS, 2, 8, generator=g)
    positions = torch.tensor([[8 * PS - 1]])
    inputs = inputs_for(q, keys, positions)
    scores = Centroid().page_scores(inputs)  # [1, 1, 2, 8]
    mask = choose_pages(scores, positions, torch.tensor([[4]]), PS, keep_sink=True)
    assert mask.sum(-1).tolist() == [[[4, 4]]]
    assert mask[0, 0, :, 0].all() and mask[0, 0, :, 7].all()  # sink and own page
    logits = brute_page_logits(q, keys).mean(-1)[0, 0]  # [H, P]: the estimate, by brute force
    for h in range(2):
        group = logits[3 * h:3 * h + 3, :7]  # the pages before the query's own
        rank = group.argsort(-1, descending=True).argsort(-1).amin(0)  # best rank in the group
        chosen = [p for p in range(1, 7) if mask[0, 0, h, p]]
        left = [p for p in range(1, 7) if not mask[0, 0, h, p]]
        assert len(chosen) == 2
        assert max(rank[chosen]) <= min(rank[left]), (h, rank.tolist(), chosen)


def test_twilight_mass_estimate_bounds_each_page_and_its_error_is_measured(loaded):
    """exp(q.c / sqrt(D)) * page_size never exceeds a page's true unnormalized attention
    mass (Jensen: a bound that must bound), and the shares it gives differ from the true
    shares by a total variation measured on the bundled model's keys (medians 0.17,
    0.71, 0.42 in layers 2, 15, 29 when written): flatter than the truth, so top-p takes
    at least the pages the true mass needs on average."""
    for layer in (2, 15, 29):
        q, k = real_qk(loaded, bench_text(), layer)
        length = k.shape[0] // PS * PS
        q, k = q[None, length - 4:length], k[None, :length]
        positions = torch.arange(length - 4, length)[None]
        inputs = inputs_for(q, k, positions)
        logits = centroid_logits(inputs)  # [1, Hkv, 4, G, P]
        num_pages, dim, num_kv = logits.shape[-1], q.shape[-1], k.shape[2]
        true = brute_page_logits(q, k) * dim ** -0.5  # [1, 4, H, P, PS]
        bound = PS * (logits.double() * dim ** -0.5).exp().permute(0, 2, 1, 3, 4).reshape(
            1, 4, -1, num_pages)
        assert (bound <= true.exp().sum(-1) * (1 + 1e-6)).all(), f"layer {layer}"
        unseen = unseen_pages(positions, num_pages, PS)[:, None, :, None, :]
        share = estimated_page_shares(logits, unseen, dim)
        mass = page_attention_mass(inputs).masked_fill(unseen, 0)
        mass = mass / mass.sum(-1, keepdim=True)
        tv = 0.5 * (share - mass).abs().sum(-1)
        assert 0.05 < tv.median() < 0.8, f"layer {layer}: {tv.median():.3f}"

        def needed(x):  # pages until 90% of the mass, per query head
            o = x.sort(-1, descending=True).values
            return ((o.cumsum(-1) - o) < 0.9).sum(-1).double().mean()

        assert needed(share) >= needed(mass) - 0.5, f"layer {layer}"
        assert share.shape[1] == num_kv


def test_twilight_reads_few_pages_when_one_holds_the_mass_and_the_cap_when_flat():
    g = torch.Generator().manual_seed(5)
    keys = 0.1 * torch.randn(1, 8 * PS, 1, 8, generator=g)
    keys[0, 3 * PS:4 * PS, 0] += 4.0  # page 3's keys all point along the ones vector
    positions = torch.tensor([[8 * PS - 1]])  # own page 7; candidates 1..6, sink 0
    cap = torch.tensor([[6]])
    sharp = torch.ones(1, 1, 3, 8)  # 3 query heads on one KV head, aligned with page 3
    mask = choose_pages(Twilight().page_scores(inputs_for(sharp, keys, positions)), positions,
                        cap, PS, keep_sink=True)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [0, 3, 7]  # sink, page 3, own
    flat = torch.zeros(1, 1, 3, 8)  # every page's share equal: 0.9 of them is all: the cap
    mask = choose_pages(Twilight().page_scores(inputs_for(flat, keys, positions)), positions,
                        cap, PS, keep_sink=True)
    assert mask[0, 0, 0].sum() == 6
    whole = Twilight()
    whole.top_p = 1.0  # no adaptive cut: the centroid ranking under the budget
    inputs = inputs_for(sharp, keys, positions)
    torch.testing.assert_close(whole.page_scores(inputs), Centroid().page_scores(inputs))


# ---------------------------------------------------------------- choosing


def test_choose_pages_forces_sink_and_own_page_and_respects_the_budget():
    # one query at position 100 (page 6), 8 pages listed, budget 4 pages
    scores = torch.tensor([[[[9., 1., 5., 3., 7., 2., 0., 8.]]]])
    mask = choose_pages(scores, torch.tensor([[100]]), torch.tensor([[4]]), PS, keep_sink=True)
    # forced: page 0 (sink) and page 6 (own); then the 2 best of pages 1..5: 4 (7.) and 2 (5.)
    # page 7 scores 8. but lies after the query: invisible
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [0, 2, 4, 6]
    mask = choose_pages(scores, torch.tensor([[100]]), torch.tensor([[4]]), PS, keep_sink=False)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [0, 2, 4, 6]  # page 0 wins on score
    mask = choose_pages(scores, torch.tensor([[100]]), torch.tensor([[1]]), PS, keep_sink=True)
    assert mask[0, 0, 0].nonzero().flatten().tolist() == [0, 6]  # forced pages beyond budget


def test_oracle_attends_exactly_the_k_best_pages_by_brute_force():
    g = torch.Generator().manual_seed(3)
    batch, num_pages, num_kv, group, dim = 2, 9, 2, 2, 8
    q = torch.randn(batch, 1, num_kv * group, dim, generator=g) * 2
    keys = torch.randn(batch, num_pages * PS, num_kv, dim, generator=g)
    positions = torch.full((batch, 1), num_pages * PS - 1)
    scores = Oracle().page_scores(inputs_for(q, keys, positions))
    k = 4
    mask = choose_pages(scores, positions, torch.full((batch, 1), k), PS, keep_sink=False)
    for b in range(batch):
        for h in range(num_kv):
            mass = torch.zeros(num_pages, dtype=torch.float64)
            for gi in range(group):
                logits = keys[b, :, h].double() @ q[b, 0, h * group + gi].double() / dim ** 0.5
                mass += logits.softmax(0).view(num_pages, PS).sum(1)
            best = set(mass[:-1].topk(k - 1).indices.tolist()) | {num_pages - 1}  # + own page
            assert set(mask[b, 0, h].nonzero().flatten().tolist()) == best


# ---------------------------------------------------------------- attention


def test_sparse_decode_attention_reads_only_selected_pages():
    g = torch.Generator().manual_seed(4)
    num_pages, num_kv, group, dim = 12, 2, 3, 16
    k_pages = torch.randn(num_pages, PS, num_kv, dim, generator=g)
    v_pages = torch.randn(num_pages, PS, num_kv, dim, generator=g)
    q = torch.randn(1, num_kv * group, dim, generator=g)
    head_tables = torch.tensor([[[3, 7, 9], [1, 7, 9]]])  # per KV head; page 9 holds 5 tokens
    lens = torch.tensor([2 * PS + 5])
    out = torch_sparse_decode_attention(q, k_pages, v_pages, head_tables, lens)
    for h in range(num_kv):
        keys = torch.cat([k_pages[p, :, h] for p in head_tables[0, h].tolist()])[:2 * PS + 5]
        values = torch.cat([v_pages[p, :, h] for p in head_tables[0, h].tolist()])[:2 * PS + 5]
        for gi in range(group):
            row = h * group + gi
            ref = (keys @ q[0, row] / dim ** 0.5).softmax(0) @ values
            torch.testing.assert_close(out[0, row], ref, rtol=1e-5, atol=1e-5)


def test_sparse_kernel_matches_torch_and_dense_kernel_when_all_selected():
    from speckv.kv.cpu_kernels import load_cpu_kernels

    kernels = load_cpu_kernels()
    g = torch.Generator().manual_seed(5)
    k_pages = torch.randn(20, PS, 3, 64, generator=g)
    v_pages = torch.randn(20, PS, 3, 64, generator=g)
    q = torch.randn(2, 9, 64, generator=g)
    tables = torch.tensor([[4, 2, 11, 7], [5, 6, 19, 0]])
    lens = torch.tensor([3 * PS + 9, 4 * PS])
    head_tables = tables[:, None, :].expand(2, 3, 4).contiguous()
    sparse = kernels.sparse_decode_attention(q, k_pages, v_pages, head_tables, lens, 64 ** -0.5, NO_ROWS, 0)
    dense = kernels.paged_decode_attention(q, k_pages, v_pages, tables, lens, 64 ** -0.5, NO_ROWS, 0, 0)
    assert torch.equal(sparse, dense)  # the same per-head routine: bit-identical
    head_tables = torch.tensor([[[4, 11, 7], [2, 11, 7], [4, 2, 7]],
                                [[5, 6, 0], [6, 19, 0], [5, 19, 0]]])
    lens = torch.tensor([2 * PS + 9, 3 * PS])
    torch.testing.assert_close(
        kernels.sparse_decode_attention(q, k_pages, v_pages, head_tables, lens, 64 ** -0.5, NO_ROWS, 0),
        torch_sparse_decode_attention(q, k_pages, v_pages, head_tables, lens), rtol=1e-5, atol=1e-5)


def test_page_mask_restricts_the_softmax_to_selected_pages():
    g = torch.Generator().manual_seed(6)
    k_pages = torch.randn(6, PS, 1, 8, generator=g)
    v_pages = torch.randn(6, PS, 1, 8, generator=g)
    q = torch.randn(1, 1, 2, 8, generator=g)
    table = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[[[True, False, True, True]]]])
    out = paged_attention(q, k_pages, v_pages, table, torch.tensor([4 * PS]),
                          torch.tensor([[4 * PS - 1]]), page_mask=mask)
    keys = torch.cat([k_pages[p, :, 0] for p in (0, 2, 3)])
    values = torch.cat([v_pages[p, :, 0] for p in (0, 2, 3)])
    for h in range(2):
        ref = (keys @ q[0, 0, h] / 8 ** 0.5).softmax(0) @ values
        torch.testing.assert_close(out[0, 0, h], ref, rtol=1e-5, atol=1e-5)


def test_summaries_are_min_max_and_mean_per_channel_and_travel_as_bytes():
    store = SummaryStore(4, 2, 3, dtype=torch.float32, device=torch.device("cpu"))
    ids = store.allocate(2)
    keys = torch.randn(2, PS, 2, 3)
    store.summarize(torch.as_tensor(ids), keys)
    got = store.gather(torch.as_tensor(ids)[None])[0]  # [2, Hkv, 2, D]
    torch.testing.assert_close(got[:, :, 0], keys.amin(1))
    torch.testing.assert_close(got[:, :, 1], keys.amax(1))
    torch.testing.assert_close(store.gather_centroids(torch.as_tensor(ids)[None])[0, :, :, 0],
                               keys.mean(1))
    blob = store.to_bytes(ids)
    assert blob.shape == (2, store.slot_bytes) and store.slot_bytes == 3 * 2 * 3 * 4
    other = store.allocate(2)
    store.from_bytes(other, blob)
    torch.testing.assert_close(store.gather(torch.as_tensor(other)[None]), got[None])
    torch.testing.assert_close(store.gather_centroids(torch.as_tensor(other)[None])[0, :, :, 0],
                               keys.mean(1))
    store.free(ids)
    store.free(other)
    assert store.num_used == 0


def test_summary_slices_are_the_mean_keys_of_equal_slices_and_travel_as_bytes():
    store = SummaryStore(4, 2, 3, dtype=torch.float32, device=torch.device("cpu"), slices=4)
    assert store.slot_bytes == (2 + 4) * 2 * 3 * 4
    ids = store.allocate(2)
    keys = torch.randn(2, PS, 2, 3)
    store.summarize(torch.as_tensor(ids), keys)
    got = store.gather_centroids(torch.as_tensor(ids)[None])[0]  # [2, Hkv, 4, D]
    for s in range(4):
        torch.testing.assert_close(got[:, :, s], keys[:, 4 * s:4 * s + 4].mean(1))
    torch.testing.assert_close(got.mean(2), keys.mean(1))  # equal slices: the page's mean
    other = store.allocate(2)
    store.from_bytes(other, store.to_bytes(ids))
    assert torch.equal(store.gather_centroids(torch.as_tensor(other)[None])[0], got)
    assert torch.equal(store.gather(torch.as_tensor(other)[None]),
                       store.gather(torch.as_tensor(ids)[None]))


# ---------------------------------------------------------------- the engine


def prompts(loaded, lengths):
    ids = loaded.tokenizer.encode(bench_text())
    return [ids[i * 37:i * 37 + n] for i, n in enumerate(lengths)]


def run(llm, token_lists, params):
    outs = llm.engine.generate_all(token_lists, params)
    return [o.token_ids for o in outs]


def test_full_through_the_selector_path_and_whole_budget_quest_equal_dense(loaded, make_llm):
    llm = make_llm(device_kv_bytes="96MiB")
    batch = prompts(loaded, [300, 181, 420])
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    reference = run(llm, batch, [greedy] * 3)
    # a mixed batch runs the sparse path: the `full` rows get every page through it
    mixed = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, selector="quest",
                            token_budget=64),
             greedy, greedy]
    got = run(llm, batch, mixed)
    assert got[1:] == reference[1:]
    assert got[0] != reference[0]  # 64 tokens of ~340: quest changes the text
    twilight = llm.engine.selection.selectors["twilight"]
    twilight.top_p = 1.0  # its adaptive cut would drop pages the whole budget allows
    try:
        for name in ("quest", "centroid", "twilight"):
            whole = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, selector=name,
                                   token_budget=1.0)
            assert run(llm, batch, [whole] * 3) == reference, name
    finally:
        twilight.top_p = Twilight.top_p
    with pytest.raises(ValueError, match="needs summary_slices >= 2"):
        run(llm, batch[:1], [SamplingParams(temperature=0, max_tokens=4, selector="subpage")])
    sliced = make_llm(device_kv_bytes="96MiB", summary_slices=4)
    for name in ("subpage", "centroid"):
        whole = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, selector=name,
                               token_budget=1.0)
        assert run(sliced, batch, [whole] * 3) == reference, name
    sparse = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, selector="subpage",
                            token_budget=64)
    assert run(sliced, batch, [sparse] * 3) != reference
    assert_no_leak(sliced.engine)
    sparse = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, selector="centroid",
                            token_budget=64)
    assert run(llm, batch, [sparse] * 3) != reference
    stats = llm.stats()
    assert 0 < stats["selection_pages_selected"] < stats["selection_pages_visible"]
    assert_no_leak(llm.engine)


def test_sink_recent_reads_the_sink_and_the_latest_pages(loaded, make_llm):
    llm = make_llm(device_kv_bytes="64MiB", selector="sink_recent", token_budget=64,
                   min_context_tokens=0)
    run(llm, prompts(loaded, [200]), [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
    per_layer = llm.stats()["selection_fraction_per_layer"]
    assert per_layer[0] == per_layer[1] == 1.0  # dense layers
    assert all(f < 0.4 for f in per_layer[2:])  # 4 of ~13 pages
    assert_no_leak(llm.engine)


def test_evaluation_mode_measures_recall_and_oracle_overlap(loaded, make_llm):
    llm = make_llm(device_kv_bytes="64MiB", selection_eval=True, selector="quest",
                   token_budget=128)
    run(llm, prompts(loaded, [400]), [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])
    stats = llm.stats()
    assert 0.5 < stats["selection_recall"] < 1.0
    assert 0.3 < stats["selection_oracle_overlap"] <= 1.0
    oracle = make_llm(device_kv_bytes="64MiB", selection_eval=True, selector="oracle",
                      token_budget=128)
    run(oracle, prompts(loaded, [400]), [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)])
    assert oracle.stats()["selection_oracle_overlap"] == pytest.approx(1.0)
    assert oracle.stats()["selection_recall"] > stats["selection_recall"]


@pytest.mark.parametrize("kv_read", ["copy", "in_place"])
def test_unselected_pages_are_not_read_from_the_pool(loaded, make_llm, kv_read):
    """Copy: quest's pages are chosen first, then only those are fetched. In place: one
    fused kernel call chooses and reads them; the reference (no pool) uses that kernel
    too, so `copy` also checks that the fused choice equals the unfused one."""
    batch = prompts(loaded, [500, 470])
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2
    tight = dict(device_kv_bytes="12MiB", pool="local", pool_bytes="256MiB", kv_read=kv_read)
    dense = make_llm(**tight)
    sparse = make_llm(**tight, selector="quest", token_budget=96)
    reference = make_llm(device_kv_bytes="96MiB", selector="quest", token_budget=96)
    try:
        want = run(reference, batch, params)
        assert run(sparse, batch, params) == want  # codec none: the tiers change nothing
        run(dense, batch, params)
        d, s = dense.stats(), sparse.stats()
        moved = "tier_pages_fetched" if kv_read == "copy" else "tier_pages_read_in_place"
        if kv_read == "copy":
            assert s["tier_fetches_skipped"] > 0 and s["tier_fetch_bytes_skipped"] > 0
            assert d["tier_fetches_skipped"] == 0
        assert 0 < s[moved] < d[moved] / 2
        assert s["selection_fraction"] < 0.5 and d["selection_fraction"] == 1.0
        for llm in (dense, sparse, reference):
            assert_no_leak(llm.engine)
    finally:
        dense.close()
        sparse.close()


def test_score_continuation_equals_greedy_decoding(loaded, make_llm):
    llm = make_llm(device_kv_bytes="64MiB")
    prefix = prompts(loaded, [333])[0]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, selector="quest",
                            token_budget=64)
    decoded = run(llm, [prefix], [params])[0]
    last, (logits,) = llm.engine.score_continuation(prefix, decoded, [("quest", 64)])
    assert [int(last.argmax())] + logits[:-1].argmax(-1).tolist() == decoded
    assert_no_leak(llm.engine)


# ---------------------------------------------------------------- bad input


def test_bad_selection_options_name_the_problem(make_llm, llm):
    with pytest.raises(ValueError, match="unknown selector 'topk'; known: centroid, full, oracle, quest"):
        make_llm(selector="topk")
    with pytest.raises(ValueError, match="token_budget must be >= 1 token"):
        make_llm(token_budget=0)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        make_llm(token_budget=1.5)
    with pytest.raises(ValueError, match="dense_layers=31 is more than the model's 30 layers"):
        make_llm(dense_layers=31)
    with pytest.raises(ValueError, match=r"summary_slices \(3\) must divide page_size \(16\)"):
        make_llm(summary_slices=3)
    with pytest.raises(ValueError, match="summary_slices must be >= 1"):
        make_llm(summary_slices=0)
    with pytest.raises(ValueError, match="'subpage' .* needs summary_slices >= 2"):
        make_llm(selector="subpage")
    with pytest.raises(ValueError, match="above the context window"):
        make_llm(token_budget=100_000)
    engine = llm.engine
    with pytest.raises(ValueError, match="above the request's context of 13 tokens"):
        engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=10, token_budget=64))
    with pytest.raises(ValueError, match="unknown selector"):
        engine.add_request([1, 2, 3], SamplingParams(temperature=0, selector="nope"))
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        SamplingParams(temperature=0, token_budget=0)
    # nothing was added: the engine still serves
    assert run(llm, [[1, 2, 3]], [SamplingParams(temperature=0, max_tokens=2)])
    assert_no_leak(engine)
    assert {"full", "quest", "sink_recent", "oracle"} <= set(SELECTORS.names())  # built-ins (plugins may add)
