"""`speckv bench kvread`: attention reading pooled pages in place vs copying them first.

For each batch size and context (`--shapes`, BATCHxCONTEXT), in one process on the
same weights, the same random prompts prefilled once per engine:

  all-resident   pool none, DEVICE holds every page in the compute dtype (float32);
  copy           a memory node (`--pool-link`), codec `--pool-codec`, DEVICE at
                 `--device-fraction` of the working set: each step fetches the
                 pooled pages it reads into DEVICE slots, decodes them, then attends;
  in_place       the same pool and codec; attention reads each pool row where it
                 lies, decoding it as it streams (DEVICE holds unpooled pages only);
                 timed again with the kernels' software prefetch of each next page
                 switched off, to show what that prefetch buys, and with a
                 predictor's hints (`--in-place-predictor`) software-prefetching the
                 rows of coming layers into the caches.

Each engine decodes `--steps` timed steps (after one warm-up) per selector
(`--selectors`; switched per request on the running sequences), so `full` and
`quest` compare on the same sequences. Reported: median step time, decode tok/s,
ratios against all-resident and copy, stall fraction, pool pages read per step.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from speckv.bench.common import publish
from speckv.bench.steps import make_engine, prefill, time_steps, working_set_bytes


def add_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("kvread", help="pooled pages read in place vs copied into DEVICE first",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="32x1024,8x4096",
                   help="BATCHxCONTEXT pairs, comma-separated (default: 32x1024,8x4096)")
    p.add_argument("--pool-codec", default="int8", help="codec of the pooled engines (default: int8)")
    p.add_argument("--pool-link", default="cxl2-x16",
                   help="link model of the pooled engines' memory node (default: cxl2-x16)")
    p.add_argument("--selectors", default="full,quest:0.25",
                   help="selectors to time, NAME[:BUDGET], comma-separated (default: full,quest:0.25)")
    p.add_argument("--device-fraction", type=float, default=0.125,
                   help="DEVICE budget of the pooled engines, as a fraction of the working set "
                        "(default: 0.125)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per selector (default: 8)")
    p.add_argument("--in-place-predictor", default="layer_ahead",
                   help="predictor whose hints the in-place engine is also timed with "
                        "(default: layer_ahead; none: skip)")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_engine_options(p)


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for part in text.split(","):
        batch, sep, context = part.strip().partition("x")
        if not sep or not batch.isdigit() or not context.isdigit() or int(batch) < 1 or int(context) < 16:
            raise ValueError(f"--shapes entry {part!r}: write BATCHxCONTEXT, e.g. 8x4096")
        shapes.append((int(batch), int(context)))
    return shapes


def _selectors(text: str) -> list[tuple[str, float | None]]:
    out = []
    for part in text.split(","):
        name, _, budget = part.strip().partition(":")
        out.append((name, float(budget) if budget else None))
    return out


def _time_selectors(llm, selectors, steps: int, batch: int, context: int, name: str,
                    extra: dict) -> list[dict[str, Any]]:
    """Times `steps` decode steps per selector, switched on the running sequences."""
    rows = []
    for selector, budget in selectors:
        for seq in list(llm.engine.scheduler.running):
            llm.engine.set_selection(seq.request_id, selector, budget)
        r = time_steps(llm, steps)
        r["pool_pages_per_step"] = r.pop("pages_from_pool_per_step")
        rows.append({"batch": batch, "context": context, "config": name,
                     "selector": selector if budget is None else f"{selector} {budget:g}",
                     **extra, **r})
    return rows


def run(ns: argparse.Namespace, options: dict[str, Any]) -> int:
    from tqdm.auto import tqdm

    from speckv.config import EngineConfig
    from speckv.models.loaded import load_model
    from speckv.plugins import check_names

    shapes, selectors = _shapes(ns.shapes), _selectors(ns.selectors)
    if not 0 < ns.device_fraction < 1 or ns.steps < 1:
        raise ValueError("need 0 < --device-fraction < 1 and --steps >= 1")
    for mode in ("copy", "in_place"):  # a bad option fails before any run
        check_names(EngineConfig.from_kwargs(**options, pool="memnode", codec=ns.pool_codec,
                                             link=ns.pool_link, kv_read=mode,
                                             predictor=ns.in_place_predictor))
    loaded = load_model(EngineConfig.from_kwargs(**options).model)
    rows: list[dict[str, Any]] = []
    n_steps = 3 * (ns.steps + 1) * len(selectors) + 4  # the in-place engine's passes
    with tqdm(total=3 * len(shapes), desc="kvread", file=sys.stderr) as bar:
        for batch, context in shapes:
            working = working_set_bytes(loaded, batch, context, n_steps)
            configs = [("all-resident", {"device_kv_bytes": int(working * 1.05) + (16 << 20)})]
            for mode in ("copy", "in_place"):
                configs.append((mode, {"device_kv_bytes": int(working * ns.device_fraction),
                                       "pool": "memnode", "codec": ns.pool_codec, "link": ns.pool_link,
                                       "pool_bytes": int(working * 1.1) + (64 << 20),
                                       "kv_read": mode}))
            for name, extra in configs:
                llm = make_engine(loaded, options, max_num_seqs=batch, **extra)
                try:
                    prefill(llm, batch, context, n_steps)
                    kernels = llm.engine._kernels if name == "in_place" else None
                    for prefetch in (True, False) if kernels is not None else (True,):
                        if kernels is not None:
                            kernels.set_software_prefetch(prefetch)
                        label = name if prefetch else f"{name}, no software prefetch"
                        rows.extend(_time_selectors(llm, selectors, ns.steps, batch, context,
                                                    label, extra))
                    if kernels is not None and ns.in_place_predictor != "none":
                        kernels.set_software_prefetch(True)
                        llm.engine.set_prefetch(ns.in_place_predictor)
                        rows.extend(_time_selectors(
                            llm, selectors, ns.steps, batch, context,
                            f"{name}, {ns.in_place_predictor} hints", extra))
                        llm.engine.set_prefetch("none")
                finally:
                    if kernels is not None:
                        kernels.set_software_prefetch(True)
                    llm.close()
                bar.update(1)
    for r in rows:
        same = [o for o in rows if (o["batch"], o["context"], o["selector"]) ==
                (r["batch"], r["context"], r["selector"])]
        ref = {o["config"]: o["tok_s"] for o in same}
        r["vs_resident"] = r["tok_s"] / ref["all-resident"]
        r["vs_copy"] = r["tok_s"] / ref["copy"]
    publish({"options": options, "codec": ns.pool_codec, "link": ns.pool_link,
             "device_fraction": ns.device_fraction, "steps": ns.steps, "rows": rows},
            format_table, ns.json)
    return 0


def format_table(report: dict[str, Any]) -> str:
    lines = [f"codec {report['codec']}, memnode {report['link']}, DEVICE "
             f"{report['device_fraction']:g} of the working set (pooled engines); "
             f"{report['steps']} timed steps",
             "| batch | context | selector | config | step ms | tok/s | vs all-resident | "
             "vs copy | stall | pool pages/step |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['selector']} | {r['config']} | "
                     f"{r['step_ms']:.0f} | {r['tok_s']:.1f} | {r['vs_resident']:.2f}x | "
                     f"{r['vs_copy']:.2f}x | {100 * r['stall_fraction']:.1f}% | "
                     f"{r['pool_pages_per_step']:,.0f} |")
    return "\n".join(lines)
