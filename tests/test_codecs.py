"""Codecs on real KV pages of the bundled model: stated error bounds and exact sizes."""

from __future__ import annotations

import pytest
import torch

from speckv import SamplingParams
from speckv.codecs import PageShape, known_codecs, make_codec
from speckv.kv.attention import NO_ROWS
from speckv.pool.local import LocalPool

CODECS = ["none", "fp16", "bf16", "int8", "kivi4", "kivi2", "seed", "int8+zstd", "kivi2+zstd",
          "none+zstd"]
TEXT = ("The river ran past the old mill, where the miller's daughter counted sacks of flour "
        "and sang to the geese. In the evening the lamps were lit along the bank. ") * 4


@pytest.fixture(scope="module")
def real_pages(make_llm):
    """K and V pages of every layer after prefilling a natural-language prompt."""
    llm = make_llm(device_kv_bytes="32MiB")
    engine = llm.engine
    rid = engine.add_request(TEXT, SamplingParams(temperature=0, max_tokens=2))
    engine.step()
    table = engine.cache.table(rid)
    full = table.num_pages - 1  # sealed pages only
    slots = torch.from_numpy(table.slots[:, :full].reshape(-1))
    k = engine.cache.pool.k_pages[slots].clone()
    v = engine.cache.pool.v_pages[slots].clone()
    engine.abort(rid)
    return k, v


def _shape(k: torch.Tensor) -> PageShape:
    return PageShape(k.shape[1], k.shape[2], k.shape[3], k.dtype)


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_error_is_within_the_stated_bound(real_pages, name):
    k, v = real_pages
    codec = make_codec(name, _shape(k))
    k2, v2 = codec.decode(codec.encode(k, v).data)
    k_bound, v_bound = codec.error_bound(k, v)
    assert k2.dtype == k.dtype and k2.shape == k.shape
    assert ((k2 - k).abs() <= k_bound).all(), f"K error {(k2 - k).abs().max()}"
    assert ((v2 - v).abs() <= v_bound).all(), f"V error {(v2 - v).abs().max()}"
    if codec.lossless:
        assert torch.equal(k2, k) and torch.equal(v2, v)
    else:
        assert not torch.equal(k2, k)  # a lossy codec that changes nothing is suspicious


@pytest.mark.parametrize("name", CODECS)
def test_reported_size_is_exactly_the_bytes_that_matter(real_pages, name):
    """Bytes past `nbytes` carry nothing: zeroing them decodes to the same pages, and a
    pool charges exactly the reported sizes."""
    k, v = real_pages
    codec = make_codec(name, _shape(k))
    encoded = codec.encode(k, v)
    assert encoded.data.shape == (k.shape[0], codec.slot_bytes)
    assert (encoded.nbytes <= codec.slot_bytes).all() and (encoded.nbytes > 0).all()
    cut = encoded.data.clone()
    cut[torch.arange(codec.slot_bytes)[None, :] >= encoded.nbytes[:, None]] = 0
    ref_k, ref_v = codec.decode(encoded.data)
    got_k, got_v = codec.decode(cut)
    assert torch.equal(ref_k, got_k) and torch.equal(ref_v, got_v)
    pool = LocalPool(codec.slot_bytes, codec.slot_bytes * k.shape[0], device=torch.device("cpu"))
    keys = pool.allocate(k.shape[0])
    pool.store_batch(keys, encoded.data, encoded.nbytes)
    assert pool.stats().encoded_bytes == pool.stats().bytes_written == int(encoded.nbytes.sum())
    assert torch.equal(pool.load_batch(keys, torch.device("cpu")), encoded.data)


def test_fixed_size_codecs_are_the_sum_of_their_parts(real_pages):
    k, v = real_pages
    shape = _shape(k)
    elems = shape.page_size * shape.num_kv_heads * shape.head_dim  # per K (or V)
    k_groups = shape.num_kv_heads * shape.head_dim  # per channel
    v_groups = shape.page_size * shape.num_kv_heads  # per token and head
    expected = {
        "none": 2 * elems * 4,
        "fp16": 2 * elems * 2,
        "int8": 2 * elems + 2 * (k_groups + v_groups),  # codes + fp16 scales
        "kivi4": 2 * elems // 2 + 4 * (k_groups + v_groups),  # codes + fp16 scale and zero
        "kivi2": 2 * elems // 4 + 4 * (k_groups + v_groups),
    }
    for name, size in expected.items():
        encoded = make_codec(name, shape).encode(k, v)
        assert (encoded.nbytes == size).all(), name


def test_seed_pipeline_is_int8_exactly_plus_lossless_stages(real_pages):
    """The seed's delta coding wraps modulo 256 instead of overflowing: it decodes to
    exactly what int8 decodes to."""
    k, v = real_pages
    shape = _shape(k)
    int8 = make_codec("int8", shape)
    seed = make_codec("seed", shape)
    a = int8.decode(int8.encode(k, v).data)
    b = seed.decode(seed.encode(k, v).data)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_unknown_codec_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown codec 'int3'; known codecs: bf16, fp16"):
        make_codec("int3", PageShape(16, 3, 64, torch.float32))
    assert "kivi2" in known_codecs() and "<codec>+zstd" in known_codecs()


@pytest.mark.parametrize("name", ["none", "int8", "kivi4"])
def test_fused_cpu_fetch_decodes_exactly_like_the_torch_path(real_pages, name):
    """The C++ fetch (pool row -> DEVICE slot in one pass) equals gather + decode + scatter."""
    from speckv.kv.cpu_kernels import load_cpu_kernels
    from speckv.kv.page_pool import DevicePagePool
    from speckv.kv.tiers import TieredStore, TierOptions

    k, v = real_pages
    n = k.shape[0]
    fetched = []
    for kernels in (None, load_cpu_kernels()):
        device = DevicePagePool(2 * n, k.shape[1], k.shape[2], k.shape[3], dtype=k.dtype,
                                device=torch.device("cpu"))
        codec = make_codec(name, _shape(k))
        backend = LocalPool(codec.slot_bytes, codec.slot_bytes * n, device=torch.device("cpu"))
        store = TieredStore(device, backend, codec, TierOptions(), kernels=kernels)
        slots = device.allocate(n)
        device.k_pages[torch.from_numpy(slots)] = k
        device.v_pages[torch.from_numpy(slots)] = v
        keys = store.store(slots)
        target = device.allocate(n)[::-1].copy()  # other slots, in another order
        store.fetch(keys, target)
        index = torch.from_numpy(target)
        fetched.append((device.k_pages[index], device.v_pages[index]))
        assert backend.stats().pages_loaded == n
    (k0, v0), (k1, v1) = fetched
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    bound_k, bound_v = make_codec(name, _shape(k)).error_bound(k, v)
    assert ((k1 - k).abs() <= bound_k).all() and ((v1 - v).abs() <= bound_v).all()


@pytest.mark.parametrize("name", ["none", "int8", "kivi4"])
def test_kernels_read_pool_rows_exactly_as_decode_does(real_pages, name):
    """Attention reading the codec's rows in place (dense and per-head sparse, partial last
    pages, pool rows and DEVICE pages mixed) equals attention over `decode`'s pages: max
    abs diff 0, because the kernels decode with the same float operations in the same
    order (kivi: a product, then a sum, never an FMA)."""
    from speckv.kv.cpu_kernels import FORMATS, load_cpu_kernels

    kernels = load_cpu_kernels()
    k, v = real_pages  # [n, 16, 3, 64] real keys and values of the bundled model
    n, ps, hkv, dim = k.shape
    codec = make_codec(name, _shape(k))
    rows = codec.encode(k, v).data.contiguous()
    fmt = FORMATS[codec.row_format]
    dk, dv = codec.decode(rows)
    dk, dv = dk.contiguous(), dv.contiguous()
    gk, gv = kernels.gather_pages(dk, dv, rows, fmt, -1 - torch.arange(n))
    assert torch.equal(gk, dk) and torch.equal(gv, dv)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3 * hkv, dim, generator=g)
    pages = torch.randperm(n, generator=g)[:8].view(2, 4)
    lens = torch.tensor([4 * ps - 5, 3 * ps + 1])  # partial last pages
    mixed = torch.where(torch.arange(4) % 2 == 0, -1 - pages, pages)  # rows and DEVICE pages
    scale = dim ** -0.5
    in_place = kernels.paged_decode_attention(q, dk, dv, mixed, lens, scale, rows, fmt, 0)
    decoded = kernels.paged_decode_attention(q, dk, dv, pages, lens, scale, NO_ROWS, 0, 0)
    assert (in_place - decoded).abs().max().item() == 0.0
    heads = torch.stack([pages[:, [0, 2, 3]], pages[:, [1, 2, 3]], pages[:, [0, 1, 3]]], dim=1)
    selected_lens = lens - ps
    in_place = kernels.sparse_decode_attention(q, dk, dv, -1 - heads, selected_lens, scale, rows, fmt)
    decoded = kernels.sparse_decode_attention(q, dk, dv, heads, selected_lens, scale, NO_ROWS, 0)
    assert (in_place - decoded).abs().max().item() == 0.0
