"""`speckv bench contention`: batch-1 decode tok/s on a quiet machine and beside one busy
process, for speckv's thread policies and HF transformers, in one run.

Policies: `--threads N` fixed at every core (torch's default, what speckv did before
the automatic policy), `--threads 1`, and the automatic default (`--threads 0`, see
`speckv.engine.threads`); HF transformers at torch's default. The busy neighbour is
one process spinning on one core (`python -c "while True: pass"`), started before the
measured process and stopped after it. Every (engine, condition) runs in a fresh
subprocess; the rounds alternate engines and conditions so that machine noise hits
all alike. Reported: the median decode tok/s over the rounds, the slowdown beside the
busy process, and quiet speed relative to the fixed all-core policy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Any

from speckv.bench.common import in_subprocess, publish
from speckv.bench.throughput import _run_hf, _run_speckv
from speckv.engine.threads import available_cores


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("contention", help="decode speed quiet vs beside a busy process",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="rounds over every configuration "
                                                         "(default: 2)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens (default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (default: 3)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def _busy() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _measure(fn, options: dict, busy: bool, ns: argparse.Namespace) -> dict[str, Any]:
    neighbour = _busy() if busy else None
    try:
        return in_subprocess(fn, options, 1, ns.prompt_len, ns.new_tokens, ns.repeats)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def run(ns: argparse.Namespace, options: dict) -> int:
    if ns.rounds < 1 or ns.prompt_len < 1 or ns.new_tokens < 2 or ns.repeats < 1:
        raise ValueError("--rounds, --prompt-len and --repeats must be >= 1, --new-tokens >= 2")
    from tqdm.auto import tqdm

    cores = available_cores()
    options = {k: v for k, v in options.items() if k != "threads"}
    os.environ.pop("OMP_NUM_THREADS", None)  # it would fix the automatic policy's count
    engines = [(f"speckv --threads {cores} (fixed)", _run_speckv, {**options, "threads": cores}),
               ("speckv --threads 1", _run_speckv, {**options, "threads": 1}),
               ("speckv automatic", _run_speckv, {**options, "threads": 0})]
    if not ns.no_hf:
        engines.append(("hf transformers", _run_hf, options))
    samples: dict[tuple[str, bool], list[float]] = {}
    with tqdm(total=ns.rounds * len(engines) * 2, desc="contention", file=sys.stderr) as bar:
        for _ in range(ns.rounds):
            for name, fn, opts in engines:
                for busy in (False, True):
                    r = _measure(fn, opts, busy, ns)
                    samples.setdefault((name, busy), []).append(r["decode_tok_s"])
                    bar.update(1)
    rows = [{"engine": name, "quiet_tok_s": statistics.median(samples[(name, False)]),
             "busy_tok_s": statistics.median(samples[(name, True)]),
             "quiet_samples": samples[(name, False)], "busy_samples": samples[(name, True)]}
            for name, _, _ in engines]
    publish({"options": options, "cores": cores, "prompt_len": ns.prompt_len,
             "new_tokens": ns.new_tokens, "repeats": ns.repeats, "rounds": ns.rounds,
             "results": rows}, format_table, ns.json)
    return 0


def format_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    fixed = rows[0]["quiet_tok_s"]
    lines = [f"batch 1, {report['prompt_len']}-token prompt, {report['new_tokens']} new tokens, "
             f"{report['cores']} cores; median of {report['rounds']} rounds",
             "| engine | quiet tok/s | beside a busy process tok/s | slowdown | quiet vs "
             "fixed all-core |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['quiet_tok_s']:.1f} | {r['busy_tok_s']:.1f} | "
                     f"{r['quiet_tok_s'] / r['busy_tok_s']:.2f}x | "
                     f"{r['quiet_tok_s'] / fixed:.2f}x |")
    return "\n".join(lines)
