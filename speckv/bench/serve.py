"""`speckv bench serve`: throughput and latency of `speckv serve` under concurrent clients.

Starts a real server process (with the engine options given here), then sends one
fixed request set (`--requests` completions, prompt lengths cycling through
`--prompt-tokens`, `--max-tokens` cycling, EOS ignored so every request does the
same work in every run) with the official `openai` async client:

  serial     one request at a time, whole responses: what a server without
             batching would do; the baseline of the ratios;
  C clients  for each C in `--clients`, C streaming requests in flight at once
             (a new one starts when one ends).

Per run: requests/s, output tokens/s, time to first token and inter-token latency
(p50/p99 over requests; a request's ITL is its mean gap after the first token),
and checks that every request finished exactly once with its max_tokens and no
error. After each run the server must return to idle: every DEVICE page free; its
RSS is recorded at idle before the first run and after each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from speckv.bench.common import bench_text, parse_ints, publish


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("serve", help="serving throughput/latency at 1..64 concurrent clients",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,8,32,64",
                   help="concurrent clients per run (default: 1,8,32,64)")
    p.add_argument("--requests", type=int, default=64, help="requests per run (default: 64)")
    p.add_argument("--prompt-tokens", default="32,128,512,64,256",
                   help="prompt lengths in tokens, cycled over the requests (default: 32,128,512,64,256)")
    p.add_argument("--max-tokens", default="32,64,48",
                   help="max_tokens values, cycled over the requests (default: 32,64,48)")
    p.add_argument("--no-serial", action="store_true", help="skip the one-at-a-time baseline")
    p.add_argument("--plot", help="save tokens/s and latency against clients (PNG)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def request_set(n: int, prompt_tokens: list[int], max_tokens: list[int]) -> list[dict[str, Any]]:
    """`n` completion requests; prompts are slices of the benchmark text (~4 chars/token)."""
    words = bench_text().split()
    out = []
    for i in range(n):
        length = prompt_tokens[i % len(prompt_tokens)]
        start = (i * 37) % max(1, len(words) - length)
        out.append({"prompt": " ".join(words[start:start + int(length * 0.75)]),
                    "max_tokens": max_tokens[i % len(max_tokens)]})
    return out


def _cli_flags(options: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            for v in value:
                flags += [flag, str(v)]
        else:
            flags += [flag, str(value)]
    return flags


async def _one(client, model: str, req: dict, stream: bool) -> dict[str, Any]:
    start = time.perf_counter()
    args = dict(model=model, prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=0,
                extra_body={"ignore_eos": True})
    if not stream:
        out = await client.completions.create(**args)
        end = time.perf_counter()
        return {"ttft": end - start, "itl": None, "latency": end - start,
                "tokens": out.usage.completion_tokens, "finishes": 1,
                "prompt_tokens": out.usage.prompt_tokens}
    first = last = None
    finishes, usage = 0, None
    async for chunk in await client.completions.create(
            **args, stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        if chunk.choices[0].text and first is None:
            first = now
        last = now
        finishes += chunk.choices[0].finish_reason is not None
    tokens = usage.completion_tokens if usage else 0
    itl = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"ttft": (first or last) - start, "itl": itl, "latency": last - start,
            "tokens": tokens, "finishes": finishes,
            "prompt_tokens": usage.prompt_tokens if usage else 0}


async def _run(url: str, model: str, requests: list[dict], clients: int, stream: bool) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(requests):
        queue.put_nowait((i, req))
    results: dict[int, list] = {}
    errors: list[str] = []

    async def worker():
        while not queue.empty():
            i, req = queue.get_nowait()
            try:
                results.setdefault(i, []).append(await _one(client, model, req, stream))
            except Exception as exc:  # noqa: BLE001 — counted and reported
                errors.append(f"request {i}: {type(exc).__name__}: {exc}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return _summarize(requests, results, errors, wall, clients, stream)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _summarize(requests, results, errors, wall, clients, stream) -> dict:
    done = [r[0] for r in results.values() if r]
    bad = [i for i, req in enumerate(requests)
           if len(results.get(i, [])) != 1 or results[i][0]["finishes"] != 1
           or results[i][0]["tokens"] != req["max_tokens"]]
    tokens = sum(r["tokens"] for r in done)
    ttft = [r["ttft"] for r in done]
    itl = [r["itl"] for r in done if r["itl"] is not None]
    return {
        "clients": clients, "stream": stream, "requests": len(requests), "wall_s": wall,
        "requests_per_s": len(done) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": _pct(ttft, 0.5), "ttft_p99_s": _pct(ttft, 0.99),
        "itl_p50_s": _pct(itl, 0.5), "itl_p99_s": _pct(itl, 0.99),
        "errors": errors[:5], "num_errors": len(errors), "requests_wrong": bad,
        "prompt_tokens_mean": statistics.mean(r["prompt_tokens"] for r in done) if done else 0,
    }


def run(ns: argparse.Namespace, engine_options: dict[str, Any]) -> int:
    from speckv.server.process import ServerProcess

    clients = parse_ints(ns.clients, "--clients")
    if ns.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {ns.requests}")
    requests = request_set(ns.requests, parse_ints(ns.prompt_tokens, "--prompt-tokens"),
                           parse_ints(ns.max_tokens, "--max-tokens"))
    server = ServerProcess("--max-waiting", str(max(clients) + ns.requests),
                           *_cli_flags(engine_options))
    try:
        model = _model_name(server)
        asyncio.run(_run(server.url, model, requests[:2], 1, True))  # warm up
        idle = server.wait_idle()
        memory = {"idle_rss_bytes": server.rss_bytes(), "pages_total": idle["speckv_device_pages_capacity"]}
        runs = []
        plan = ([] if ns.no_serial else [(1, False)]) + [(c, True) for c in clients]
        for c, stream in plan:
            label = f"{c} clients" if stream else "serial"
            print(f"bench serve: {label} ...", flush=True)
            result = asyncio.run(_run(server.url, model, requests, c, stream))
            after = server.wait_idle()
            result["pages_free_after"] = after["speckv_device_pages_free"]
            result["rss_after_bytes"] = server.rss_bytes()
            runs.append(result)
        status = server.stop()
    finally:
        server.stop()
    report = publish({"engine_options": engine_options, "request_set": {
        "requests": ns.requests, "prompt_tokens": ns.prompt_tokens, "max_tokens": ns.max_tokens},
        "memory": memory, "runs": runs, "server_exit_status": status}, format_table, ns.json)
    if ns.plot:
        plot(report, ns.plot)
    failed = any(r["num_errors"] or r["requests_wrong"] for r in runs)
    return 1 if failed or status != 0 else 0


def _model_name(server) -> str:
    import json

    return json.loads(server.get("/v1/models")[1])["data"][0]["id"]


def format_table(report: dict) -> str:
    runs = report["runs"]
    base = next((r for r in runs if not r["stream"]), None)

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    lines = [f"speckv bench serve  {report['date']}  {report['machine']}",
             f"{'run':<11} {'req/s':>6} {'tok/s':>7} {'x serial':>8} {'ttft p50':>8} "
             f"{'ttft p99':>8} {'itl p50':>7} {'itl p99':>7} {'errors':>6} {'wrong':>5} "
             f"{'pages free':>10} {'rss MiB':>7}"]
    for r in runs:
        ratio = "-" if base is None else f"{r['output_tokens_per_s'] / base['output_tokens_per_s']:.2f}x"
        rss = "-" if r["rss_after_bytes"] is None else f"{r['rss_after_bytes'] / 2**20:.0f}"
        lines.append(
            f"{('serial' if not r['stream'] else str(r['clients']) + ' clients'):<11} "
            f"{r['requests_per_s']:>6.2f} {r['output_tokens_per_s']:>7.1f} {ratio:>8} "
            f"{ms(r['ttft_p50_s']):>8} {ms(r['ttft_p99_s']):>8} {ms(r['itl_p50_s']):>7} "
            f"{ms(r['itl_p99_s']):>7} {r['num_errors']:>6} {len(r['requests_wrong']):>5} "
            f"{r['pages_free_after']:>10.0f} {rss:>7}")
    mem = report["memory"]
    idle = mem["idle_rss_bytes"]
    lines.append(f"idle: {mem['pages_total']:.0f} DEVICE pages free, RSS "
                 f"{'-' if idle is None else f'{idle / 2**20:.0f} MiB'}; server exit status "
                 f"{report['server_exit_status']}  (latencies in ms)")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["stream"]]
    base = next((r for r in report["runs"] if not r["stream"]), None)
    xs = [r["clients"] for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r["output_tokens_per_s"] for r in runs], "o-", label="speckv serve")
    if base is not None:
        left.axhline(base["output_tokens_per_s"], color="gray", ls="--", label="serial")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="output tokens/s",
             title="throughput")
    left.set_xticks(xs, [str(x) for x in xs])
    left.legend()
    for key, style in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("itl_p50_s", "s-"),
                       ("itl_p99_s", "s--")):
        right.plot(xs, [(r[key] or 0) * 1000 for r in runs], style, label=key[:-2].replace("_", " "))
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms",
              title="latency")
    right.set_xticks(xs, [str(x) for x in xs])
    right.legend()
    fig.suptitle(f"speckv serve, {report['machine']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
