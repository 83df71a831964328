"""`speckv bench selection`: what query-aware page selection keeps, and what it buys.

Three tasks (`--tasks`, default all), each in one process on the same weights:

  passkey   a 5-digit key hidden at depths 10%..90% of filler text, contexts
            `--contexts` (tokens, key and question included), `--trials` per context;
            the prompt is prefilled once (densely, as serving does) and the answer is
            scored under every selector and budget: correct when greedy decoding would
            produce the whole key (`LLMEngine.score_continuation`, exact).
  ppl       perplexity of the F2 text (speckv/bench/data) with every query reading only
            its selected pages, `full` vs each of `--selectors` but the oracle at
            `--ppl-budgets`.
  speed     decode tokens/s at long context: batch `--batch-sizes` x contexts
            `--speed-contexts`, `full` vs each of `--speed-selectors` (default quest)
            at `--speed-budgets`, on the same prefilled sequences (selection switched
            between rounds, rounds alternate), median of `--rounds`; with the time per
            step split into attention, selection and the rest; and one layer's
            scoring + gather + attention eager vs `torch.compile` vs the C++ kernel.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Any

import torch

from speckv.bench.common import bench_text, publish
from speckv.kv.attention import NO_ROWS

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant "
         "text. Find it and memorize it. I will quiz you about it.\n")


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("selection", help="passkey accuracy, perplexity and decode speed of "
                       "page selectors", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="passkey,ppl,speed", help="comma-separated (default: all)")
    p.add_argument("--selectors", default="quest,centroid,sink_recent,oracle",
                   help="selectors compared with full (default: quest,centroid,sink_recent,oracle)")
    p.add_argument("--contexts", default="1024,2048,4096,8192",
                   help="passkey context lengths in tokens (default: 1024,2048,4096,8192)")
    p.add_argument("--trials", type=int, default=20, help="passkey trials per context (default: 20)")
    p.add_argument("--budgets", default="64,128,256,512",
                   help="passkey token budgets (default: 64,128,256,512)")
    p.add_argument("--ppl-budgets", default="0.125,0.25", help="perplexity budgets (default: 0.125,0.25)")
    p.add_argument("--batch-sizes", default="1,8", help="speed batch sizes (default: 1,8)")
    p.add_argument("--speed-contexts", default="2048,4096,8192",
                   help="speed contexts in tokens (default: 2048,4096,8192)")
    p.add_argument("--speed-budgets", default="0.125,0.25", help="speed budgets (default: 0.125,0.25)")
    p.add_argument("--speed-selectors", default="quest",
                   help="selectors timed against full (default: quest)")
    p.add_argument("--rounds", type=int, default=3, help="speed rounds per config (default: 3)")
    p.add_argument("--steps", type=int, default=6, help="timed decode steps per round (default: 6)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def _numbers(text: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected positive numbers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    """Comma-separated selector names, each one the registry knows."""
    from speckv.selection.base import SELECTORS

    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        SELECTORS.get(name)
    return names


def _budget(value: float) -> int | float:
    return int(value) if value >= 1 else value


# ---------------------------------------------------------------- passkey


def passkey_prompt(tokenizer, context: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) totalling `context` tokens, the key at `depth` of the filler."""
    enc = tokenizer.encode
    intro, filler = enc(INTRO), enc(FILLER)
    needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = enc(" What is the pass key? The pass key is")
    answer = enc(f" {key}")
    room = context - len(intro) - len(needle) - len(question) - len(answer)
    if room < len(filler):
        raise ValueError(f"context {context} is too short for a passkey prompt")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = int(depth * room)
    return intro + hay[:cut] + needle + hay[cut:] + question, answer


def run_passkey(engine, ns, configs, bar) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(2026)
    results: dict[tuple, list[bool]] = {}
    for context in _numbers(ns.contexts, int):
        for trial in range(ns.trials):
            depth = 0.1 + 0.8 * trial / max(1, ns.trials - 1)
            key = str(int(torch.randint(10000, 100000, (1,), generator=g)))
            prompt, answer = passkey_prompt(engine.tokenizer, context, depth, key)
            last, logits = engine.score_continuation(prompt, answer, [c[1:] for c in configs])
            first_ok = int(last.argmax()) == answer[0]
            for (label, _, budget), lg in zip(configs, logits):
                ok = first_ok and lg[:-1].argmax(-1).tolist() == answer[1:]
                results.setdefault((context, label, budget), []).append(ok)
            bar.update(1)
    return [{"context": c, "selector": s, "budget": b, "trials": len(v),
             "accuracy": sum(v) / len(v)} for (c, s, b), v in results.items()]


# ---------------------------------------------------------------- perplexity


def run_ppl(engine, ns, bar) -> list[dict[str, Any]]:
    ids = engine.tokenizer.encode(bench_text())
    target = torch.tensor(ids[1:])
    rows = []
    configs = [("full", None)] + [(s, _budget(b)) for s in _names(ns.selectors)
                                  if s != "oracle" for b in _numbers(ns.ppl_budgets)]
    for selector, budget in configs:
        logits = engine.score(ids, selector=selector, token_budget=budget)
        nll = torch.nn.functional.cross_entropy(logits[:-1], target).item()
        rows.append({"selector": selector, "budget": budget, "tokens": len(ids),
                     "ppl": math.exp(nll)})
        bar.update(1)
    return rows


# ---------------------------------------------------------------- speed


@contextmanager
def timed_parts(engine, clock: dict[str, float]):
    """Adds wall time of attention kernels and of page selection to `clock`."""
    from speckv.selection import step

    kernels = engine.runner.kernels
    decode, sparse, select = kernels.decode, kernels.sparse_decode, step.StepSelection.select
    fused = kernels.quest  # selection and attention in one call: counted as attention

    def timer(fn, name):
        def wrapped(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                clock[name] = clock.get(name, 0.0) + time.perf_counter() - t0
        return wrapped

    kernels.decode, kernels.sparse_decode = timer(decode, "attention"), timer(sparse, "attention")
    if fused is not None:
        kernels.quest = timer(fused, "attention")
    step.StepSelection.select = timer(select, "selection")
    try:
        yield
    finally:
        kernels.decode, kernels.sparse_decode, step.StepSelection.select = decode, sparse, select
        kernels.quest = fused


def run_speed(llm, ns, bar) -> list[dict[str, Any]]:
    from speckv import SamplingParams

    engine = llm.engine
    configs = [("full", None)] + [(s, _budget(b)) for s in _names(ns.speed_selectors)
                                  for b in _numbers(ns.speed_budgets)]
    rows = []
    g = torch.Generator().manual_seed(7)
    for context in _numbers(ns.speed_contexts, int):
        for batch in _numbers(ns.batch_sizes, int):
            # sequences prefilled first decode while the others prefill: leave them room
            chunk = engine.config.scheduler.max_num_batched_tokens
            prefill_steps = -(-batch * context // chunk) + batch
            room = ns.rounds * len(configs) * (ns.steps + 1) + prefill_steps + 2
            params = SamplingParams(max_tokens=room, ignore_eos=True)
            ids = [engine.add_request(torch.randint(100, 49000, (context - room,),
                                                    generator=g).tolist(), params)
                   for _ in range(batch)]
            started: set[str] = set()
            while len(started) < batch:  # until every prompt is prefilled
                started.update(o.request_id for o in engine.step())
            samples: dict[tuple, list[tuple[float, dict]]] = {}
            for _ in range(ns.rounds):
                for selector, budget in configs:
                    for rid in ids:
                        engine.set_selection(rid, selector, budget)
                    engine.step()  # the first step under a new selection is not timed
                    clock: dict[str, float] = {}
                    with timed_parts(engine, clock):
                        t0 = time.perf_counter()
                        for _ in range(ns.steps):
                            engine.step()
                        elapsed = time.perf_counter() - t0
                    samples.setdefault((selector, budget), []).append((elapsed, clock))
            for rid in ids:
                engine.abort(rid)
            base = None
            for selector, budget in configs:
                runs = samples[(selector, budget)]
                elapsed = statistics.median(r[0] for r in runs)
                tok_s = batch * ns.steps / elapsed
                base = base or tok_s
                parts = {k: statistics.median(r[1].get(k, 0.0) for r in runs) / ns.steps * 1000
                         for k in ("attention", "selection")}
                rows.append({"context": context, "batch": batch, "selector": selector,
                             "budget": budget, "decode_tok_s": tok_s, "vs_full": tok_s / base,
                             "step_ms": 1000 * elapsed / ns.steps,
                             "attention_ms": parts["attention"], "selection_ms": parts["selection"]})
            bar.update(1)
    return rows


def compile_check(llm, context: int = 8192, batch: int = 8, budget: float = 0.125) -> dict:
    """One layer's quest scoring + page choice + gather + attention: eager torch vs
    torch.compile of the same function vs eager scoring + the C++ sparse kernel."""
    from speckv.kv.attention import torch_sparse_decode_attention
    from speckv.selection.base import SelectionInputs, choose_pages, page_budget
    from speckv.selection.selectors import Quest

    a, ps = llm.engine.args, llm.engine.cache.page_size
    pages = context // ps
    g = torch.Generator().manual_seed(0)
    k_pages = torch.randn(batch * pages, ps, a.num_kv_heads, a.head_dim, generator=g)
    v_pages = torch.randn_like(k_pages)
    summaries = torch.stack([k_pages.amin(1), k_pages.amax(1)], 2).view(batch, pages,
                                                                           a.num_kv_heads, 2, a.head_dim)
    tables = torch.arange(batch * pages).view(batch, pages)
    q = torch.randn(batch, a.num_heads, a.head_dim, generator=g)
    lens = torch.full((batch,), context)
    positions = (lens - 1)[:, None]

    def select(q):
        inputs = SelectionInputs(q[:, None], positions, pages, ps, a.num_kv_heads,
                                 lambda: summaries, lambda: None)
        mask = choose_pages(Quest().page_scores(inputs), positions,
                            page_budget(budget, positions, ps, 0), ps, True)[:, 0]
        count = mask[:, 0].sum(-1)
        logical = torch.where(mask, torch.arange(pages), pages).sort(-1).values[..., :int(count.max())]
        head_tables = tables.gather(1, logical.clamp(max=pages - 1).reshape(batch, -1))
        return head_tables.view_as(logical), (count - 1) * ps + ps

    def eager(q):
        head_tables, sel_lens = select(q)
        return torch_sparse_decode_attention(q, k_pages, v_pages, head_tables, sel_lens)

    def timeit(fn, reps=10):
        fn(q)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)

    out = {"context": context, "batch": batch, "budget": budget, "eager_ms": timeit(eager)}
    try:
        compiled = torch.compile(eager, dynamic=False)
        out["compiled_ms"] = timeit(compiled)
    except Exception as exc:  # no compiler toolchain, unsupported op: report, do not fail
        out["compiled_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    kernels = llm.engine._kernels
    if kernels is not None:
        def kernel(q):
            head_tables, sel_lens = select(q)
            return kernels.sparse_decode_attention(q, k_pages, v_pages, head_tables, sel_lens,
                                                   a.head_dim ** -0.5, NO_ROWS, 0)
        out["kernel_ms"] = timeit(kernel)
    return out


# ---------------------------------------------------------------- driver


def run(ns: argparse.Namespace, options: dict) -> int:
    from tqdm.auto import tqdm

    from speckv import LLM

    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    unknown = set(tasks) - {"passkey", "ppl", "speed"}
    if unknown or not tasks:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; known: passkey, ppl, speed")
    selectors = _names(ns.selectors)
    _names(ns.speed_selectors)
    if ns.trials < 1 or ns.rounds < 1 or ns.steps < 1:
        raise ValueError("--trials, --rounds and --steps must be >= 1")
    configs = [("full", "full", None)] + [(s, s, _budget(b)) for s in selectors
                                          for b in _numbers(ns.budgets)]
    contexts = _numbers(ns.contexts, int) if "passkey" in tasks else []
    speed_ctx = _numbers(ns.speed_contexts, int) if "speed" in tasks else []
    longest = max(contexts + speed_ctx + [4096])
    batch = max(_numbers(ns.batch_sizes, int)) if "speed" in tasks else 1
    report: dict[str, Any] = {"options": options, "tasks": tasks}
    ppl_runs = 1 + len([s for s in selectors if s != "oracle"]) * len(_numbers(ns.ppl_budgets))
    total = (len(contexts) * ns.trials + (ppl_runs if "ppl" in tasks else 0)
             + len(speed_ctx) * len(_numbers(ns.batch_sizes, int)))
    with tqdm(total=total, desc="selection", file=sys.stderr) as bar:
        llm = LLM(**{"max_model_len": longest, **options})
        kv_bytes = llm.engine.args.kv_bytes_per_token(llm.engine.model.element_size)
        need = int(1.1 * batch * longest * kv_bytes) + (64 << 20)
        if llm.engine.config.cache.device_kv_bytes < need:
            llm.close()
            llm = LLM(**{"max_model_len": longest, **options, "device_kv_bytes": need})
        try:
            if "passkey" in tasks:
                report["passkey"] = run_passkey(llm.engine, ns, configs, bar)
            if "ppl" in tasks:
                report["ppl"] = run_ppl(llm.engine, ns, bar)
            if "speed" in tasks:
                report["speed"] = run_speed(llm, ns, bar)
                report["compile_check"] = compile_check(llm, max(speed_ctx), batch)
        finally:
            llm.close()
    publish(report, format_report, ns.json)
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = []
    if "passkey" in report:
        rows = report["passkey"]
        contexts = sorted({r["context"] for r in rows})
        lines += ["passkey accuracy (trials per cell: %d)" % rows[0]["trials"], "",
                  "| selector | budget | " + " | ".join(f"{c}" for c in contexts) + " |",
                  "|---|---:|" + "---:|" * len(contexts)]
        keys = list(dict.fromkeys((r["selector"], r["budget"]) for r in rows))
        for s, b in keys:
            acc = {r["context"]: r["accuracy"] for r in rows if (r["selector"], r["budget"]) == (s, b)}
            lines.append(f"| {s} | {b or '-'} | " + " | ".join(f"{100 * acc[c]:.0f}%" for c in contexts) + " |")
        lines.append("")
    if "ppl" in report:
        rows = report["ppl"]
        ref = rows[0]["ppl"]
        lines += ["perplexity", "", "| selector | budget | ppl | vs full |", "|---|---:|---:|---:|"]
        lines += [f"| {r['selector']} | {r['budget'] or '-'} | {r['ppl']:.3f} | "
                  f"{100 * (r['ppl'] / ref - 1):+.2f}% |" for r in rows]
        lines.append("")
    if "speed" in report:
        lines += ["decode speed", "", "| context | batch | selector | budget | decode tok/s | vs full | "
                  "step ms | attention ms | selection ms | other ms |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["speed"]:
            other = r["step_ms"] - r["attention_ms"] - r["selection_ms"]
            lines.append(f"| {r['context']} | {r['batch']} | {r['selector']} | {r['budget'] or '-'} | "
                         f"{r['decode_tok_s']:.1f} | {r['vs_full']:.2f}x | {r['step_ms']:.0f} | "
                         f"{r['attention_ms']:.0f} | {r['selection_ms']:.0f} | {other:.0f} |")
        c = report.get("compile_check", {})
        lines += ["", "one layer, scoring + choice + gather + attention (ms): " +
                  ", ".join(f"{k[:-3]} {v:.2f}" for k, v in c.items() if k.endswith("_ms")) +
                  (f"; torch.compile failed: {c['compiled_error']}" if "compiled_error" in c else "")]
    return "\n".join(lines)
