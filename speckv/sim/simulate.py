"""`speckv simulate`: project a workload, or a trace the engine wrote, onto a hardware
profile with the step model of `speckv.sim.roofline`.

    speckv simulate --model Llama-3-8B --batch 32 --context 4096 --generate 256 \\
        --profile h100-80gb-sxm --profile a100-80gb --pooled-fraction 0.9 --link cxl2-x16 \\
        --codec-ratio 0.5 --recall 0.95 --precision 0.95
    speckv generate "..." --trace run.jsonl ...; speckv simulate --trace run.jsonl --profile cpu

A trace carries its model, weights and mechanisms (its first line); its measured step
times are set beside the projection on each profile, so `--profile cpu` on a trace
written here measures the method's own error.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from typing import Any

from speckv.pool.link import KNOWN as LINKS, parse_link
from speckv.sim import hardware, shapes
from speckv.sim.roofline import Breakdown, Mechanisms, Step, decode_steps, prefill_step, \
    step_time, total


def read_trace(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(meta, step records) of a `--trace` file."""
    meta, steps = None, []
    try:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from exc
                if "meta" in record:
                    meta = record["meta"]
                else:
                    steps.append(record)
    except OSError as exc:
        raise ValueError(f"cannot read the trace {path}: {exc}") from exc
    if meta is None:
        raise ValueError(f"{path} has no meta line: write it with this version's --trace")
    if not steps:
        raise ValueError(f"{path} holds no steps")
    return meta, steps


def trace_mechanisms(meta: dict[str, Any], steps: list[dict[str, Any]]) -> Mechanisms:
    """The mechanisms a trace ran with: its weights, KV element size, selection fraction
    (pages selected / visible over the run), summaries and codec."""
    visible = sum(s.get("selection_pages_visible", 0) for s in steps)
    selected = sum(s.get("selection_pages_selected", 0) for s in steps)
    fraction = selected / visible if visible else 1.0
    dtype = meta.get("dtype") if meta.get("dtype") in hardware.DTYPES else "float32"
    return Mechanisms(weight_bytes=meta["weight_bytes"], kv_element_bytes=meta["kv_element_bytes"],
                      compute_dtype=dtype, page_size=meta["page_size"],
                      selection_fraction=min(1.0, fraction),
                      summary_bytes_per_page=meta.get("summary_bytes_per_page", 0.0),
                      codec_ratio=meta.get("codec_ratio", 1.0))


def trace_steps(steps: list[dict[str, Any]]) -> list[Step]:
    return [Step(tokens=s["tokens"], kv_tokens=s.get("kv_tokens", 0),
                 prefill_pairs=s.get("prefill_pairs", 0), decode_sequences=s.get("decode", 0))
            for s in steps]


def project_trace(path: str, profiles: list[hardware.Hardware],
                  overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every profile's projection of a trace, beside the trace's measured times."""
    meta, records = read_trace(path)
    shape = shapes.ModelShape(**meta["shape"])
    mech = replace(trace_mechanisms(meta, records), **(overrides or {}))
    steps = trace_steps(records)
    measured = [r["seconds"] for r in records]
    out: dict[str, Any] = {"trace": path, "meta": meta, "shape": shape.as_dict(),
                           "mechanisms": _mech_dict(mech), "steps": len(steps),
                           "measured_seconds": sum(measured), "profiles": []}
    for hw in profiles:
        m = mech if hw.kind != "gpu" or "compute_dtype" in (overrides or {}) else \
            replace(mech, compute_dtype="bfloat16")
        per_step = [step_time(shape, hw, m, s) for s in steps]
        errors = [(p.total - t) / t for p, t in zip(per_step, measured) if t > 0]
        decode = [i for i, s in enumerate(steps) if s.tokens == s.decode_sequences]
        entry = {"profile": hw.as_dict(), "projected": total(shape, hw, m, steps).as_dict()}
        if errors:
            entry["step_error_median"] = statistics.median(abs(e) for e in errors)
            entry["step_error_max"] = max(abs(e) for e in errors)
            entry["total_error"] = entry["projected"]["total"] / sum(measured) - 1
        if decode:
            entry["decode_tokens_per_second"] = sum(steps[i].tokens for i in decode) / sum(
                per_step[i].total for i in decode)
            entry["measured_decode_tokens_per_second"] = sum(
                steps[i].tokens for i in decode) / sum(measured[i] for i in decode)
        out["profiles"].append(entry)
    return out


def calibrate(path: str, hw: hardware.Hardware) -> hardware.Hardware:
    """`hw` with the overheads the roofline leaves out fitted on a trace's measured steps:
    least squares, relative to each step's time, of (measured - projected without
    overheads) on (1, decoding sequences, tokens, KV tokens read), each coefficient >= 0 (a negative one
    is dropped and the rest refitted). Calibrate on one trace, then project others: their error is the method's."""
    import numpy as np

    meta, records = read_trace(path)
    shape = shapes.ModelShape(**meta["shape"])
    mech = trace_mechanisms(meta, records)
    bare = replace(hw, **{k: 0.0 for k in hardware.OVERHEADS})
    steps = trace_steps(records)
    measured = np.array([r["seconds"] for r in records])
    residual = measured - np.array([step_time(shape, bare, mech, s).total for s in steps])
    features = np.array([[1.0, s.decode_sequences, s.tokens,
                          s.kv_tokens * mech.selection_fraction] for s in steps])
    # relative errors are what a projection is judged by: weigh each step by 1 / its time
    residual, features = residual / measured, features / measured[:, None]
    keep = list(range(len(hardware.OVERHEADS)))
    while True:
        coef = np.linalg.lstsq(features[:, keep], residual, rcond=None)[0]
        if (coef >= 0).all() or len(keep) == 1:
            break
        keep.pop(int(np.argmin(coef)))
    fitted = dict.fromkeys(hardware.OVERHEADS, 0.0)
    for i, c in zip(keep, coef):
        fitted[hardware.OVERHEADS[i]] = max(0.0, float(c)) * 1e6
    return replace(hw, name=f"{hw.name} calibrated", **fitted,
                   sources=hw.sources + (f"overheads fitted on the trace {path} "
                                         f"({len(steps)} steps) by speckv simulate --calibrate",))


def project_workload(shape: shapes.ModelShape, profiles: list[hardware.Hardware],
                     mech: Mechanisms, batch: int, context: int, generate: int) -> dict[str, Any]:
    """A batch's prefill and decode on each profile, its throughput, and how many such
    sequences fit beside the weights in the device's memory (what the pool frees)."""
    out: dict[str, Any] = {"shape": shape.as_dict(), "mechanisms": _mech_dict(mech),
                           "batch": batch, "context": context, "generate": generate,
                           "profiles": []}
    steps = decode_steps(batch, context, generate)
    for hw in profiles:
        prefill = step_time(shape, hw, mech, prefill_step(batch, context))
        decode = total(shape, hw, mech, steps)
        kv_device = shape.kv_bytes_per_token(mech.kv_element_bytes) * (context + generate) \
            * (1 - mech.pooled_fraction)
        free = hw.memory_gb * 1e9 - mech.weight_bytes
        out["profiles"].append({
            "profile": hw.as_dict(), "prefill": prefill.as_dict(), "decode": decode.as_dict(),
            "decode_step_seconds": decode.total / generate,
            "decode_tokens_per_second": batch * generate / decode.total,
            "max_batch_in_memory": None if free <= 0 else
            (math.inf if kv_device == 0 else int(free // kv_device)),
            "device_kv_gb": batch * kv_device / 1e9,
            "pool_kv_gb": batch * (context + generate) * mech.pooled_fraction
            * shape.kv_bytes_per_token(mech.kv_element_bytes) * mech.codec_ratio / 1e9})
    return out


def _mech_dict(mech: Mechanisms) -> dict[str, Any]:
    d = {k: getattr(mech, k) for k in mech.__dataclass_fields__}
    d["link"] = None if mech.link is None else mech.link.spec
    return d


# ---------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser(
        "simulate", help="project a workload or a --trace onto hardware profiles (roofline)",
        description=__doc__ + "\nThe step model: `pydoc speckv.sim.roofline`. Profiles: "
        + ", ".join(sorted(hardware.shipped())) + ", cpu (this machine, probed), or a JSON file.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to project (a trace, or a workload)")
    what.add_argument("--trace", help="a JSONL trace written by --trace")
    what.add_argument("--model", help="a named shape (" + ", ".join(
        s.name for s in shapes.NAMED.values()) + ") or a HF config.json")
    what.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    what.add_argument("--context", type=int, default=2048, help="prompt tokens each (default 2048)")
    what.add_argument("--generate", type=int, default=128, help="tokens generated each (default 128)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--profile", action="append", default=None,
                    help="a hardware profile (repeat to compare; default: h100-80gb-sxm)")
    mech = p.add_argument_group("mechanisms (a trace's own unless given)")
    mech.add_argument("--weight-bytes-per-param", type=float,
                      help="bytes per weight for --model (default 2: bfloat16)")
    mech.add_argument("--kv-element-bytes", type=float, help="bytes per K/V element (default 2)")
    mech.add_argument("--dtype", choices=hardware.DTYPES, help="compute dtype (default bfloat16)")
    mech.add_argument("--selection-fraction", type=float,
                      help="fraction of the KV pages a decode step reads (default 1)")
    mech.add_argument("--summary-bytes-per-page", type=float,
                      help="selection summaries read per page (all layers; default 0)")
    mech.add_argument("--pooled-fraction", type=float,
                      help="fraction of the KV read that lives behind the link (default 0)")
    mech.add_argument("--link", help=f"device-pool link: {', '.join(LINKS)}")
    mech.add_argument("--codec-ratio", type=float, help="stored / raw bytes of a pooled page (default 1)")
    mech.add_argument("--codec-decode-gbs", type=float,
                      help="the codec's decode rate in GB/s (default: line rate)")
    mech.add_argument("--recall", type=float, help="prefetch recall: needed pages fetched ahead")
    mech.add_argument("--precision", type=float, help="prefetch precision: fetched pages used")
    p.add_argument("--calibrate", action="store_true",
                   help="with --trace and one --profile: fit that profile's step, sequence and "
                        "token overheads on the trace's measured steps (then --save-profile)")
    p.add_argument("--save-profile", help="write the (calibrated) profile to this JSON file")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="draw the per-step breakdown per profile to this PNG")


def _overrides(ns: argparse.Namespace) -> dict[str, Any]:
    names = {"kv_element_bytes": "kv_element_bytes", "dtype": "compute_dtype",
             "selection_fraction": "selection_fraction",
             "summary_bytes_per_page": "summary_bytes_per_page",
             "pooled_fraction": "pooled_fraction", "codec_ratio": "codec_ratio",
             "codec_decode_gbs": "codec_decode_gbs", "recall": "prefetch_recall",
             "precision": "prefetch_precision"}
    out = {field: getattr(ns, arg) for arg, field in names.items() if getattr(ns, arg) is not None}
    if ns.link is not None:
        out["link"] = parse_link(ns.link)
    return out


def run(ns: argparse.Namespace) -> int:
    if (ns.trace is None) == (ns.model is None):
        raise ValueError("give --trace FILE or --model SHAPE (with --batch/--context/--generate)")
    if min(ns.batch, ns.context, ns.generate) < 1:
        raise ValueError("--batch, --context and --generate must be >= 1")
    profiles = [hardware.load(p) for p in (ns.profile or ["h100-80gb-sxm"])]
    overrides = _overrides(ns)
    if ns.calibrate:
        if ns.trace is None or len(profiles) != 1:
            raise ValueError("--calibrate needs --trace and exactly one --profile")
        profiles = [calibrate(ns.trace, profiles[0])]
        fitted = profiles[0]
        print(f"calibrated {fitted.name}: step {fitted.step_overhead_us:.1f} us + "
              f"{fitted.sequence_overhead_us:.1f} us per decoding sequence + "
              f"{fitted.token_overhead_us:.2f} us per token + "
              f"{fitted.kv_token_overhead_us * 1e3:.2f} ns per KV token read")
    if ns.save_profile:
        if len(profiles) != 1:
            raise ValueError("--save-profile writes one profile: give one --profile")
        with open(ns.save_profile, "w", encoding="utf-8") as fh:
            json.dump(profiles[0].as_dict(), fh, indent=2)
    if ns.trace is not None:
        if ns.weight_bytes_per_param is not None:
            raise ValueError("--weight-bytes-per-param is for --model; a trace has its weights")
        result = project_trace(ns.trace, profiles, overrides)
    else:
        shape = shapes.load(ns.model)
        per_param = 2.0 if ns.weight_bytes_per_param is None else ns.weight_bytes_per_param
        mech = Mechanisms(weight_bytes=shape.matmul_params * per_param, **overrides)
        result = project_workload(shape, profiles, mech, ns.batch, ns.context, ns.generate)
    print(table(result))
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=str)
    if ns.plot:
        plot(result, ns.plot)
        print(f"wrote {ns.plot}")
    return 0


def table(result: dict[str, Any]) -> str:
    trace = "trace" in result
    head = (f"trace {result['trace']}: {result['steps']} steps, measured "
            f"{result['measured_seconds']:.3f} s" if trace else
            f"{result['shape']['name']}: batch {result['batch']}, context {result['context']}, "
            f"generate {result['generate']}")
    lines = [head, "mechanisms: " + ", ".join(f"{k}={v}" for k, v in result["mechanisms"].items()),
             "", f"{'profile':<16} {'weights':>9} {'kv':>9} {'compute':>9} {'exposed':>9} "
             f"{'hidden':>9} {'overhead':>9} {'step':>9} {'tok/s':>9} " +
             ("  error (median / max / total)" if trace else "  max batch")]
    for entry in result["profiles"]:
        b = entry["projected"] if trace else entry["decode"]
        n = result["steps"] if trace else result["generate"]
        cells = [b[k] / n * 1e3 for k in ("weights", "kv", "compute", "exposed", "hidden",
                                           "overhead", "total")]
        rate = entry.get("decode_tokens_per_second", 0.0)
        tail = (f"  {100 * entry['step_error_median']:.1f}% / {100 * entry['step_error_max']:.1f}% "
                f"/ {100 * entry['total_error']:+.1f}% (measured "
                f"{entry.get('measured_decode_tokens_per_second', 0):.1f} tok/s)"
                if trace and "step_error_median" in entry else
                f"  {entry.get('max_batch_in_memory')}")
        lines.append(f"{entry['profile']['name']:<16} " + " ".join(f"{c:9.3f}" for c in cells)
                     + f" {rate:9.1f}" + tail)
    lines.append("(milliseconds per step, mean; exposed/hidden: link + codec transfer)")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = "trace" in result
    n = result["steps"] if trace else result["generate"]
    names = [e["profile"]["name"] for e in result["profiles"]]
    parts = ("weights", "kv", "exposed", "overhead")
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 4))
    bottom = [0.0] * len(names)
    for part in parts:
        values = []
        for e in result["profiles"]:
            b = Breakdown(**(e["projected"] if trace else e["decode"]))
            mem = b.weights + b.kv
            extra = max(0.0, b.compute - mem)  # compute-bound beyond the memory time
            values.append({"weights": b.weights, "kv": b.kv + extra, "exposed": b.exposed,
                           "overhead": b.overhead}[part] / n * 1e3)
        ax.bar(names, values, bottom=bottom, label=part if part != "kv" else "kv (+ compute beyond memory)")
        bottom = [a + v for a, v in zip(bottom, values)]
    if trace:
        ax.axhline(result["measured_seconds"] / n * 1e3, color="k", ls="--", label="measured")
    ax.set_ylabel("ms per step (mean)")
    ax.set_title(result.get("trace") or f"{result['shape']['name']} batch {result['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
