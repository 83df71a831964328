"""`speckv bench capacity`: sequences served and decode tokens/s at a fixed DEVICE budget.

The DEVICE budget holds `--base-seqs` sequences of `--seq-len` tokens all-resident
(4 x 1,024 by default: 188.7 MB of float32 KV on the bundled model). In one
process, on the same weights:

  all-resident   pool none: as many sequences as fit (`--base-seqs`), measured first
                 and again last, so machine drift shows;
  tiered         each --configs entry CODEC@BACKEND[:LINK] with `--factor` times as
                 many sequences, their pages in the pool and fetched on demand.

Each run submits its sequences at once (random prompt tokens, `--seq-len` minus
`--new-tokens` long, greedy, EOS ignored), waits until every one has its first
token, then times the rest: decode tok/s = tokens generated / time. `max
concurrent` is the engine's own admission bound for this budget (DEVICE pages a
sequence needs at once; the pool is sized to hold them), `ran together` the most sequences
observed running in one step. With `--plot`, also sweeps the budget (`--budgets`,
in sequences' worth) for all-resident and for the first tiered config at its
`max concurrent`, and draws throughput and concurrency against the budget.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from speckv.bench.common import parse_options, publish

DEFAULT_CONFIGS = ("none@local,int8@local,kivi4@local,kivi2@local,int8+zstd@local,"
                   "none@memnode,int8@memnode,none@memnode:cxl2-x16,int8@memnode:cxl2-x16,"
                   "kivi4@memnode:cxl2-x16")


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("capacity", help="concurrent sequences and decode tok/s at a fixed DEVICE budget",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per sequence (default: 64)")
    p.add_argument("--base-seqs", type=int, default=4,
                   help="sequences the DEVICE budget holds all-resident (default: 4)")
    p.add_argument("--factor", type=int, default=8,
                   help="tiered runs serve this many times --base-seqs (default: 8)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="tiered configurations CODEC@BACKEND[:LINK][/OPTION=VALUE;...], e.g. "
                        "int8@memnode:cxl2-x16/selector=quest;token_budget=256;predictor=layer_ahead "
                        f"(default: {DEFAULT_CONFIGS})")
    p.add_argument("--plot", help="sweep the budget and save throughput/concurrency vs budget (PNG)")
    p.add_argument("--budgets", default="1,2,4", help="budgets for --plot, in sequences' worth (default: 1,2,4)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def parse_config(text: str) -> dict[str, str]:
    """`int8@memnode:cxl2-x16` -> {"codec": "int8", "pool": "memnode", "link": "cxl2-x16"};
    engine options may follow a `/`, `;`-separated: `int8@memnode/selector=quest;token_budget=256`."""
    text, _, extra = text.partition("/")
    codec, sep, rest = text.partition("@")
    backend, _, link = rest.partition(":")
    if not sep or not codec or backend not in ("local", "memnode") or (link and backend != "memnode"):
        raise ValueError(f"--configs entry {text!r}: write CODEC@local or CODEC@memnode[:LINK], "
                         "e.g. int8@memnode:cxl2-x16")
    options = {"codec": codec, "pool": backend}
    if link:
        options["link"] = link
    if extra:
        options.update(parse_options(extra.replace(";", ","), "--configs"))
    return options


def measure(llm, num_seqs: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Serves `num_seqs` sequences submitted at once.

    Decode tok/s is taken over the steps in which every sequence is running and
    decoding: from the step after the last one got its first token to the step
    before the first one finishes (falling back to "until all finish" when that
    window is shorter than 4 steps, which `window_steps` then shows).
    """
    from speckv import SamplingParams

    engine = llm.engine
    g = torch.Generator().manual_seed(1234)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for _ in range(num_seqs):
        engine.add_request(torch.randint(100, 49000, (prompt_len,), generator=g).tolist(), params)
    steps = []  # (seconds, tokens, every sequence decoding, stall s, pages fetched, running)
    started_seqs, all_started_at = 0, None
    started = time.perf_counter()
    while engine.has_unfinished():
        before = llm.stats()
        t0 = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - t0
        after = llm.stats()
        ran = len(engine.scheduler.running) + sum(o.finished for o in outs)
        steady = all_started_at is not None and len(outs) == num_seqs and \
            not any(o.finished for o in outs)
        steps.append((elapsed, len(outs), steady,
                      after.get("tier_stall_seconds", 0.0) - before.get("tier_stall_seconds", 0.0),
                      after.get("tier_pages_fetched", 0) - before.get("tier_pages_fetched", 0), ran))
        started_seqs += sum(o.num_generated_tokens == 1 for o in outs)
        if all_started_at is None and started_seqs == num_seqs:
            all_started_at = len(steps)
    total_s = time.perf_counter() - started
    window = [s for s in steps if s[2]]
    if len(window) < 4:  # fall back: every step after the last first token
        window = steps[all_started_at:] or steps
    seconds = sum(s[0] for s in window)
    stats = llm.stats()
    return {"sequences": num_seqs, "ran_together": max(s[5] for s in steps),
            "decode_tok_s": sum(s[1] for s in window) / seconds,
            "window_steps": len(window), "step_ms": 1000 * seconds / len(window),
            "stall_fraction": sum(s[3] for s in window) / seconds,
            "pages_fetched_per_step": sum(s[4] for s in window) / len(window),
            "total_s": total_s, "preemptions": stats["preemptions"],
            "link_wait_s": stats.get("pool_link_wait_seconds", 0.0)}


def max_concurrent(llm, seq_len: int) -> int:
    """The engine's admission bound: sequences of `seq_len` that DEVICE can hold at once
    (the benchmark sizes the pool to hold them all)."""
    cache = llm.engine.cache
    return cache.pool.num_pages // cache.worst_requirement(seq_len)


def _engine(loaded, options: dict, budget: int, num_seqs: int, pool: dict | None, seq_len: int):
    from speckv import LLM

    extra = {}
    if pool is not None:
        from speckv.codecs import PageShape, make_codec

        a = loaded.args
        shape = PageShape(options.get("page_size", 16), a.num_kv_heads, a.head_dim,
                          loaded.model.dtype)
        slot = make_codec(pool["codec"], shape).slot_bytes
        pages = -(-seq_len // shape.page_size) * a.num_layers
        extra = {**pool, "pool_bytes": int(1.1 * num_seqs * pages * slot) + (64 << 20)}
    options = {"max_num_batched_tokens": 8192, **options}  # prefill many prompts per step
    return LLM(loaded=loaded, **{**options, "device_kv_bytes": budget,
                                 "max_num_seqs": max(num_seqs, 1), **extra})


def run(ns: argparse.Namespace, options: dict) -> int:
    from tqdm.auto import tqdm

    from speckv.config import EngineConfig
    from speckv.models.loaded import load_model
    from speckv.plugins import check_names

    if ns.seq_len <= ns.new_tokens or ns.new_tokens < 2 or ns.base_seqs < 1 or ns.factor < 1:
        raise ValueError("need --seq-len > --new-tokens >= 2, --base-seqs >= 1, --factor >= 1")
    configs = [(c, parse_config(c)) for c in ns.configs.split(",") if c.strip()]
    budgets = [float(b) for b in ns.budgets.split(",")] if ns.plot else []
    for _, pool in configs:
        check_names(EngineConfig.from_kwargs(**{**options, **pool}))  # fails before any run
    loaded = load_model(EngineConfig.from_kwargs(**options).model)
    seq_bytes = ns.seq_len * loaded.args.kv_bytes_per_token(loaded.model.element_size)
    budget = ns.base_seqs * seq_bytes
    prompt_len = ns.seq_len - ns.new_tokens
    results: list[dict[str, Any]] = []
    total = 2 + len(configs) + 2 * len(budgets)
    with tqdm(total=total, desc="capacity", file=sys.stderr) as bar:
        def one(name: str, pool: dict | None, budget_bytes: int, num_seqs: int | None) -> dict:
            llm = _engine(loaded, options, budget_bytes, num_seqs or 1, pool, ns.seq_len)
            try:
                bound = max_concurrent(llm, ns.seq_len)
                if num_seqs is None:  # serve as many as DEVICE admits, with a pool for them
                    llm.close()
                    num_seqs = bound
                    llm = _engine(loaded, options, budget_bytes, num_seqs, pool, ns.seq_len)
                r = {"config": name, "budget_bytes": budget_bytes, "max_concurrent": bound,
                     **measure(llm, num_seqs, prompt_len, ns.new_tokens)}
            finally:
                llm.close()
            bar.update(1)
            return r

        results.append(one("all-resident", None, budget, ns.base_seqs))
        for name, pool in configs:
            results.append(one(name, pool, budget, ns.factor * ns.base_seqs))
        results.append(one("all-resident", None, budget, ns.base_seqs))
        sweep = []
        for b in budgets:
            sweep.append(one("all-resident", None, int(b * seq_bytes), None))
            sweep.append(one(configs[0][0], configs[0][1], int(b * seq_bytes), None))
    report = publish({"options": options,
              "seq_len": ns.seq_len, "new_tokens": ns.new_tokens, "budget_bytes": budget,
              "base_seqs": ns.base_seqs, "factor": ns.factor, "results": results, "sweep": sweep}, format_table, ns.json)
    if ns.plot:
        plot(report, ns.plot)
    return 0


def format_table(report: dict[str, Any]) -> str:
    base = [r["decode_tok_s"] for r in report["results"] if r["config"] == "all-resident"]
    ref = statistics.mean(base)
    lines = [f"DEVICE budget {report['budget_bytes'] / 2**20:.1f} MiB = {report['base_seqs']} x "
             f"{report['seq_len']} tokens all-resident; all-resident decode {' / '.join(f'{b:.1f}' for b in base)} "
             f"tok/s (first / last run; ratios use the mean {ref:.1f})",
             "| config | sequences | ran together | max concurrent | decode tok/s | vs all-resident | "
             "step ms | stall | pages fetched/step | steps timed | preemptions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    same_budget = {r["budget_bytes"]: r["decode_tok_s"] for r in report["sweep"]
                   if r["config"] == "all-resident"}
    for r in report["results"] + report["sweep"]:
        in_sweep = r in report["sweep"]
        if in_sweep and r is report["sweep"][0]:
            lines.append("| *budget sweep, vs all-resident at the same budget* |" + " |" * 10)
        budget = f" ({r['budget_bytes'] / 2**20:.1f} MiB)" if in_sweep else ""
        if in_sweep:
            ref = same_budget[r["budget_bytes"]]
        lines.append(
            f"| {r['config']}{budget} | {r['sequences']} | {r['ran_together']} | {r['max_concurrent']} | "
            f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / ref:.2f}x | {r['step_ms']:.0f} | "
            f"{100 * r['stall_fraction']:.0f}% | {r['pages_fetched_per_step']:,.0f} | "
            f"{r['window_steps']} | {r['preemptions']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["config"] for r in report["sweep"]):
        rows = [r for r in report["sweep"] if r["config"] == name]
        mib = [r["budget_bytes"] / 2**20 for r in rows]
        label = name.replace("/", "\n").replace(";", ", ")  # a config's options, one line
        left.plot(mib, [r["decode_tok_s"] for r in rows], "o-", label=label)
        right.plot(mib, [r["ran_together"] for r in rows], "o-", label=label)
    left.set(xlabel="DEVICE budget (MiB)", ylabel="aggregate decode tokens/s",
             title="Throughput at a DEVICE budget")
    right.set(xlabel="DEVICE budget (MiB)", ylabel=f"concurrent {report['seq_len']}-token sequences",
              title="Sequences served at once")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"speckv, SmolLM2-135M fp32, {report['machine'].split(',')[0]} ({report['date']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
