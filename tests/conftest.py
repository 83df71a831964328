"""Shared fixtures: the bundled model loaded once, engines built on it, the HF reference."""

from __future__ import annotations

import os

import pytest
import torch

from speckv import LLM
from speckv.config import ModelConfig
from speckv.engine.llm_engine import LLMEngine
from speckv.engine.scheduler import Scheduler
from speckv.engine.sequence import Sequence
from speckv.kv.cache import KVCacheManager
from speckv.kv.tiers import Tier
from speckv.models.loaded import LoadedModel, load_model
from speckv.models.loader import bundled_model_path

torch.set_num_threads(max(1, torch.get_num_threads()))
# One thread count for every engine of the suite, and for the servers and nodes it
# starts: the automatic policy would follow the load that the tests' own processes
# make, and a count that changes between two compared runs changes float32 rounding.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA device: skipped, saying so, without one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def loaded() -> LoadedModel:
    return load_model(ModelConfig(device="cpu"))


@pytest.fixture(scope="session")
def make_llm(loaded):
    """Builds an `LLM` on the shared bundled weights with the given engine options."""

    def make(**options) -> LLM:
        return LLM(loaded=loaded, device="cpu", **options)

    return make


@pytest.fixture(scope="session")
def llm(make_llm) -> LLM:
    return make_llm(device_kv_bytes="128MiB")


@pytest.fixture(scope="session")
def hf_model():
    """The same GGUF loaded by HF transformers: the independent reference."""
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = bundled_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def hf_greedy(hf_model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with HF's own KV cache. (`generate(min_new_tokens=...)` would
    mask EOS, which `ignore_eos` does not: it only keeps going after EOS.)"""
    out = hf_model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        out = hf_model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values,
                       use_cache=True)
    return tokens


def assert_no_leak(engine: LLMEngine) -> None:
    """No request is left anywhere, what is still used is exactly what the prefix cache
    holds (every reference count back to 0), and once it is reset every page is back in
    the free pool of every tier."""
    cache = engine.cache
    pool = cache.pool
    assert_prefix_cache_holds_the_rest(cache)
    assert cache.reset_prefix_cache()
    assert pool.num_free_pages == pool.num_pages, f"{pool.num_used_pages} pages leaked"
    assert cache.num_sequences() == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.num_unfinished() == 0
    assert cache.summaries.num_used == 0, f"{cache.summaries.num_used} page summaries leaked"
    if cache.store is not None:
        backend = cache.store.backend
        assert backend.num_free == backend.num_slots, "pool slots leaked"
        assert backend.stats().encoded_bytes == 0
        assert cache.committed_pages == 0 and cache.num_evicted == 0
        assert cache.reserved_pool_pages == 0
        assert cache.num_pooled_resident == 0 and cache.num_slots_held() == 0
    prefetcher = engine.prefetcher
    if prefetcher is not None and prefetcher.buffer is not None:
        prefetcher.drain()  # transfers in flight complete (or release) first
        assert prefetcher.buffer.num_used == 0, f"{prefetcher.buffer.num_used} PREFETCH pages leaked"
        assert not prefetcher.buffer.keys()


def assert_prefix_cache_holds_the_rest(cache: KVCacheManager) -> None:
    """With no request left, the only pages in use are the prefix cache's idle ones."""
    prefix = cache.prefix
    if prefix is None:
        return
    layers = cache.num_layers
    assert prefix.num_idle == len(prefix), "a cached page is still referenced"
    assert cache.pool.num_used_pages == layers * prefix.num_idle_sharing_slots
    assert cache.summaries.num_used == layers * len(prefix)
    if cache.store is not None:
        backend = cache.store.backend
        assert backend.num_slots - backend.num_free == layers * prefix.num_idle_sharing_keys


def step_without_model(cache: KVCacheManager, scheduler: Scheduler) -> list[Sequence]:
    """One engine step without a model: computes the scheduled chunks, samples a token for
    every sequence whose prompt is done, stores sealed pages and offers them to the prefix
    cache (as `LLMEngine.step` does), removes finished ones; returns the sequences that ran."""
    out = scheduler.schedule()
    for seq, chunk in zip(out.seqs, out.chunks):
        seq.num_computed_tokens += chunk.num_tokens
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(7)
    cache.store_sealed([(s.request_id, s.num_computed_tokens) for s in out.seqs])
    if cache.prefix is not None:
        for seq in out.seqs:
            cache.prefix.keys_of(seq.page_keys, seq.all_token_ids[:seq.num_computed_tokens])
            cache.cache_pages(seq.request_id, seq.page_keys, seq.num_computed_tokens)
    for seq in list(out.seqs):
        if len(seq.output_token_ids) == seq.params.max_tokens:
            scheduler.remove(seq.request_id)
    return out.seqs


def check_tier_invariants(engine: LLMEngine) -> None:
    """Invariants 2 and 3 at a step boundary: every page that may leave DEVICE is in the
    pool, a page not in the pool is resident, and no tier holds more than its budget."""
    cache = engine.cache
    store = cache.store
    backend = store.backend
    first = store.first_stored
    resident, stored_keys = set(), set()
    for page in ([] if cache.prefix is None else cache.prefix.idle_pages()):
        resident.update(page.slots[page.slots >= 0].tolist())
        stored_keys.update(page.pool_keys[page.pool_keys >= 0].tolist())
    for rid, table in zip(cache.request_ids(), cache.all_tables()):
        n = table.num_pages
        slots, keys = table.slots[:, :n], table.pool_keys[:, :n]
        stored = slice(first, first + table.num_stored)
        assert (keys[:, stored] >= 0).all(), "a page due in the pool is not stored"
        assert all(backend.contains(int(k)) for k in keys[:, stored].reshape(-1))
        pinned = slots[:, :first].tolist() + slots[:, first + table.num_stored:].tolist()
        assert all(s >= 0 for row in pinned for s in row), "an unstored page left DEVICE"
        assert (keys[:, first + table.num_stored:] == -1).all()
        resident.update(slots[slots >= 0].tolist())
        stored_keys.update(keys[keys >= 0].tolist())
        assert ((cache.tiers(rid) == Tier.DEVICE) == (slots >= 0)).all()
    assert len(resident) == cache.pool.num_used_pages <= cache.pool.num_pages
    assert cache.committed_pages <= cache.held_pages <= cache.pool.num_pages
    assert cache.reserved_pool_pages <= backend.num_slots
    assert backend.num_slots - backend.num_free == len(stored_keys), \
        "pool slots not held by a live or cached page"
    if cache.reads_in_place:  # a stored page is read from the pool: it left DEVICE at once
        for table in cache.all_tables():
            n = table.num_pages
            stored_now = table.pool_keys[:, :n] >= 0
            assert (table.slots[:, :n][stored_now] == -1 - table.pool_keys[:, :n][stored_now]).all()
    assert (engine.cache.pool.num_used_pages * engine.page_bytes
            <= engine.config.cache.device_kv_bytes)
    prefetcher = engine.prefetcher
    if prefetcher is not None and prefetcher.buffer is not None:  # its own budget
        assert prefetcher.buffer.num_used * engine.page_bytes <= engine.config.prefetch.prefetch_bytes


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, object]:
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return finals
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError("engine did not finish")
