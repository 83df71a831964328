"""`speckv bench prefetch`: what speculative prefetching hides, and how well it predicts.

Tasks (`--tasks`):

  stall    For each batch size and context (`--batches`, `--contexts`): all-resident
           (pool none, DEVICE holds everything) and, for each link (`--links`), a memnode
           pool with DEVICE at `--device-fraction` of the working set. The sequences
           are prefilled once per engine; then each predictor (`--predictors`, `none`
           first) runs `--steps` decode steps on the same sequences (switched with
           `LLMEngine.set_prefetch`, one warm-up step each). Reported per row: median
           step time, tok/s, stall fraction (seconds the steps waited for pages — demand
           fetches and late prefetches — over step seconds), prefetch hit rate (pool
           pages served from PREFETCH / pool pages the steps needed), waste (dropped
           unused / issued), and decode tok/s against all-resident.
  quality  Precision and recall of each predictor's page sets against the pages the
           layers really read, under `quest` at token budgets `--budgets`, generating
           `--steps` x 4 tokens after a 2,048-token prompt of natural text (layers that
           select pages only; the dense first layers are not scored).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from speckv.bench.common import bench_text, parse_ints, publish
from speckv.bench.steps import make_engine as _engine, prefill as _prefill, time_steps as _time_steps
from speckv.bench.steps import working_set_bytes as _working_set_bytes


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("prefetch", help="stall hidden by prefetching, and predictor quality",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="stall,quality", help="stall, quality (default: both)")
    p.add_argument("--batches", default="8,32", help="batch sizes (default: 8,32)")
    p.add_argument("--contexts", default="1024,4096", help="context lengths (default: 1024,4096)")
    p.add_argument("--links", default="cxl2-x16,pcie4-x16",
                   help="memnode link models (default: cxl2-x16,pcie4-x16)")
    p.add_argument("--predictors", default="none;layer_ahead;step_ahead;speculative_query",
                   help="predictor sets to compare, ';'-separated (default: "
                        "none;layer_ahead;step_ahead;speculative_query)")
    p.add_argument("--device-fraction", type=float, default=0.125,
                   help="DEVICE budget as a fraction of the working set (default: 0.125)")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per predictor (default: 8)")
    p.add_argument("--budgets", default="128,256,512", help="quest budgets for quality (default: 128,256,512)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def run(ns: argparse.Namespace, options: dict[str, Any]) -> int:
    from speckv.config import EngineConfig
    from speckv.models.loaded import load_model
    from speckv.plugins import check_names
    from speckv.pool.link import parse_link

    tasks = [t.strip() for t in ns.tasks.split(",") if t.strip()]
    if not tasks or set(tasks) - {"stall", "quality"}:
        raise ValueError(f"--tasks wants stall and/or quality, got {ns.tasks!r}")
    predictor_sets = [p.strip() for p in ns.predictors.split(";") if p.strip()]
    for p in predictor_sets:
        check_names(EngineConfig.from_kwargs(**options, predictor=p))
    links = [link.strip() for link in ns.links.split(",") if link.strip()]
    for link in links:
        if parse_link(link) is None:
            raise ValueError(f"--links: {link!r} is no link model")
    if not 0 < ns.device_fraction < 1:
        raise ValueError(f"--device-fraction must be in (0, 1), got {ns.device_fraction}")
    if ns.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {ns.steps}")
    batches, contexts = parse_ints(ns.batches, "--batches"), parse_ints(ns.contexts, "--contexts")
    budgets = parse_ints(ns.budgets, "--budgets")
    loaded = load_model(EngineConfig.from_kwargs(**options).model)
    fields: dict[str, Any] = {"options": options, "steps": ns.steps}
    if "stall" in tasks:
        fields["device_fraction"] = ns.device_fraction
        fields["stall"] = stall(loaded, options, batches, contexts, links, predictor_sets,
                                ns.device_fraction, ns.steps, _saver(ns.json, fields))
    if "quality" in tasks:
        fields["quality"] = quality(loaded, options, budgets, ns.steps * 4)
    publish(fields, format_table, ns.json)
    return 0


# ---------------------------------------------------------------- stall


def _saver(path: str | None, fields: dict):
    """Writes the rows so far to `path` (a long run cut short keeps what it measured)."""
    def save(rows: list[dict]) -> None:
        if path:
            with open(path + ".partial", "w") as fh:
                json.dump({**fields, "stall": rows}, fh, indent=2)
    return save


def stall(loaded, options, batches, contexts, links, predictor_sets, fraction, steps,
          save) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    n_steps = (steps + 1) * len(predictor_sets) + 4
    combos = [(b, c) for b in batches for c in contexts]
    with tqdm(total=len(combos) * (1 + len(links)), desc="stall", file=sys.stderr) as bar:
        for batch, context in combos:
            working = _working_set_bytes(loaded, batch, context, n_steps)
            llm = _engine(loaded, options, device_kv_bytes=int(working * 1.05) + (16 << 20),
                          max_num_seqs=batch)
            try:
                _prefill(llm, batch, context, n_steps)
                base = _time_steps(llm, steps)
            finally:
                llm.close()
            rows.append({"batch": batch, "context": context, "link": "-", "config": "all-resident",
                         "device_bytes": int(working * 1.05), **base, "vs_resident": 1.0})
            bar.update(1)
            for link in links:
                rows.extend(_pooled(loaded, options, batch, context, link, predictor_sets,
                                    working, fraction, steps, n_steps, base))
                save(rows)
                bar.update(1)
    return rows


def _pooled(loaded, options, batch, context, link, predictor_sets, working, fraction, steps,
            n_steps, base) -> list[dict]:
    page_bytes = loaded.args.kv_bytes_per_token(4) // loaded.args.num_layers * 16
    layer_bytes = working // loaded.args.num_layers
    llm = _engine(loaded, options, device_kv_bytes=int(working * fraction), pool="memnode",
                  pool_bytes=int(working * 1.1) + (64 << 20), link=link, max_num_seqs=batch,
                  prefetch_bytes=2 * layer_bytes + 64 * page_bytes)
    rows = []
    try:
        _prefill(llm, batch, context, n_steps)
        for predictors in predictor_sets:
            llm.engine.set_prefetch(predictors)
            r = _time_steps(llm, steps)
            rows.append({"batch": batch, "context": context, "link": link, "config": predictors,
                         "device_bytes": int(working * fraction),
                         "prefetch_bytes": 2 * layer_bytes + 64 * page_bytes, **r,
                         "vs_resident": r["tok_s"] / base["tok_s"]})
    finally:
        llm.close()
    return rows


# ---------------------------------------------------------------- quality


def quality(loaded, options, budgets, new_tokens: int) -> list[dict]:
    from speckv import SamplingParams

    names = ["layer_ahead", "step_ahead", "speculative_query"]
    prompt = loaded.tokenizer.encode(bench_text())[:2048]
    rows = []
    for budget in budgets:
        llm = _engine(loaded, options, pool="local", pool_bytes="1GiB", device_kv_bytes="1GiB",
                      selector="quest", token_budget=budget, predictor=",".join(names))
        try:
            llm.generate(prompt, SamplingParams(temperature=0, max_tokens=new_tokens,
                                                ignore_eos=True), use_tqdm=False)
            s = llm.stats()
        finally:
            llm.close()
        for name in names:
            rows.append({"budget": budget, "predictor": name,
                         "precision": s.get(f"prefetch_{name}_precision"),
                         "recall": s.get(f"prefetch_{name}_recall"),
                         "pages_read": s.get(f"prefetch_{name}_read")})
    return rows


def format_table(report: dict) -> str:
    lines = [f"speckv bench prefetch  {report['date']}  {report['machine']}"]
    if "stall" in report:
        lines += [f"stall: DEVICE = {report['device_fraction']:.3f} of the working set, "
                  f"median of {report['steps']} decode steps per row",
                  "| batch | context | link | predictor | step ms | tok/s | vs all-resident | "
                  "stall | hit rate | waste | late | overtaken | pool pages/step |",
                  "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["stall"]:
            lines.append(
                f"| {r['batch']} | {r['context']} | {r['link']} | {r['config']} | {r['step_ms']:.0f} | "
                f"{r['tok_s']:.1f} | {r['vs_resident']:.2f}x | {100 * r['stall_fraction']:.1f}% | "
                f"{100 * r['hit_rate']:.0f}% | {100 * r['waste']:.0f}% | {r['late']:.0f} | "
                f"{r.get('overtaken', 0):.0f} | {r['pages_from_pool_per_step']:,.0f} |")
    if "quality" in report:
        lines += ["quality: predicted page sets vs pages read (quest, layers that select)",
                  "| budget | predictor | precision | recall |", "|---:|---|---:|---:|"]
        for r in report["quality"]:
            p, rc = r["precision"], r["recall"]
            lines.append(f"| {r['budget']} | {r['predictor']} | "
                         f"{'-' if p is None else f'{p:.3f}'} | {'-' if rc is None else f'{rc:.3f}'} |")
    return "\n".join(lines)
