"""Paged attention: the PyTorch path against dense attention, and the CPU kernel
against the PyTorch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from speckv import SamplingParams
from speckv.kv.attention import NO_ROWS, paged_attention, torch_decode_attention


def _pages(num_pages=40, page_size=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_pages, page_size, hkv, d, generator=g),
            torch.randn(num_pages, page_size, hkv, d, generator=g))


def _dense(q, k, v, positions):
    """q: [Q, H, D] at `positions`; k, v: [L, Hkv, D] -> causal GQA attention [Q, H, D]."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    mask = torch.arange(k.shape[0])[None, :] <= positions[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask)
    return out.transpose(0, 1)


def test_paged_prefill_chunk_matches_dense():
    k_pages, v_pages = _pages()
    table = torch.tensor([[7, 3, 12, 0]])  # a sequence of 14 tokens over 4 scattered pages
    k = k_pages[table[0]].reshape(-1, 2, 8)[:14]
    v = v_pages[table[0]].reshape(-1, 2, 8)[:14]
    q = torch.randn(1, 5, 6, 8)  # the last 5 tokens (positions 9..13), 6 query heads
    positions = torch.arange(9, 14)[None]
    out = paged_attention(q, k_pages, v_pages, table, torch.tensor([14]), positions)
    ref = _dense(q[0], k, v, positions[0])
    assert torch.allclose(out[0], ref, atol=1e-5)


def test_page_subset_keeps_true_positions():
    """Listing pages 0 and 2 only (logical indices given) attends exactly their tokens."""
    k_pages, v_pages = _pages()
    table = torch.tensor([[5, 9, 2]])
    q = torch.randn(1, 1, 4, 8)
    out = paged_attention(q, k_pages, v_pages, table[:, [0, 2]], torch.tensor([11]),
                          torch.tensor([[10]]), page_indices=torch.tensor([[0, 2]]))
    keep = torch.cat([k_pages[5], k_pages[2][:3]]), torch.cat([v_pages[5], v_pages[2][:3]])
    ref = _dense(q[0], keep[0], keep[1], torch.tensor([100]))
    assert torch.allclose(out[0], ref, atol=1e-5)


@pytest.mark.parametrize("d, page_size, hkv, group", [(64, 16, 3, 3), (8, 4, 2, 1), (128, 8, 1, 4), (24, 5, 2, 2)])
def test_cpu_kernel_matches_torch_path(d, page_size, hkv, group):
    from speckv.kv.cpu_kernels import load_cpu_kernels

    kernels = load_cpu_kernels()
    k_pages, v_pages = _pages(num_pages=64, page_size=page_size, hkv=hkv, d=d, seed=d)
    batch, listed = 5, 9
    table = torch.randperm(64)[:batch * listed].view(batch, listed)
    lens = torch.tensor([1, page_size, 3 * page_size + 1, listed * page_size, 17])
    q = torch.randn(batch, hkv * group, d)
    ref = torch_decode_attention(q, k_pages, v_pages, table, lens)
    out = kernels.paged_decode_attention(q, k_pages, v_pages, table, lens, d ** -0.5,
                                         NO_ROWS, 0, 0)
    assert torch.allclose(out, ref, atol=1e-5)


def test_sliding_window_attends_the_last_window_positions():
    """Mistral's window: query i sees keys j with i - window < j <= i, across pages."""
    k_pages, v_pages = _pages()
    table = torch.tensor([[7, 3, 12, 0]])
    k = k_pages[table[0]].reshape(-1, 2, 8)[:14]
    v = v_pages[table[0]].reshape(-1, 2, 8)[:14]
    q = torch.randn(1, 5, 6, 8)
    positions = torch.arange(9, 14)[None]
    out = paged_attention(q, k_pages, v_pages, table, torch.tensor([14]), positions, window=6)
    for i, pos in enumerate(range(9, 14)):  # keys pos-5 .. pos, dense
        keys = slice(pos - 5, pos + 1)
        ref = _dense(q[0, i:i + 1], k[keys], v[keys], torch.tensor([100]))
        assert torch.allclose(out[0, i], ref[0], atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 4, 9, 30, 200])
def test_cpu_kernel_window_matches_torch_path(window):
    """Windows shorter than a page, page-aligned, across pages, longer than the context;
    entries before the window name a pool row that does not exist: never read."""
    from speckv.kv.cpu_kernels import load_cpu_kernels

    kernels = load_cpu_kernels()
    k_pages, v_pages = _pages(num_pages=64, page_size=4, hkv=2, d=64, seed=window)
    table = torch.randperm(64)[:5 * 9].view(5, 9)
    lens = torch.tensor([1, 4, 13, 36, 17])
    q = torch.randn(5, 6, 64)
    ref = torch_decode_attention(q, k_pages, v_pages, table, lens, window=window)
    first_page = (lens - window).clamp(min=0) // 4
    unread = torch.arange(9)[None] < first_page[:, None]
    poisoned = torch.where(unread, -10 ** 6, table)  # a pool row far past the empty arena
    out = kernels.paged_decode_attention(q, k_pages, v_pages, poisoned, lens, 64 ** -0.5,
                                         NO_ROWS, 0, window)
    assert torch.allclose(out, ref, atol=1e-5)
    if window >= 36:
        assert torch.allclose(out, torch_decode_attention(q, k_pages, v_pages, table, lens),
                              atol=1e-5)


def test_backends_give_identical_greedy_tokens(make_llm, llm):
    torch_llm = make_llm(device_kv_bytes="64MiB", attention_backend="torch")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = ["The tallest mountain on Earth is", "Python is a programming language that"]
    assert ([o.token_ids for o in torch_llm.generate(prompts, params)]
            == [o.token_ids for o in llm.generate(prompts, params)])


def test_cpu_kernel_backend_needs_float32_cpu():
    from speckv import LLM

    with pytest.raises(ValueError, match="attention_backend='cpu_kernel' needs device cpu and dtype float32"):
        LLM(dtype="bfloat16", attention_backend="cpu_kernel", device="cpu", device_kv_bytes="8MiB")
