"""Validation of `speckv simulate` on this machine (issue F10): the method's own error.

1. a calibration run (32 requests of 64-312 prompt tokens and 4-128 new tokens, so its
   decode batch falls from 32 to 1) is traced; `speckv simulate --calibrate` fits the
   CPU profile's overheads on it (the probe measures bandwidth and GEMM peak);
2. other workloads, not used for the fit, are traced: 512-token prompts, 64 new
   tokens, batch 1 / 8 / 32 all-resident, and batch 8 / 32 with pool local, codec int8,
   quest at 25% (the F7 headline's mechanisms);
3. each is projected with the calibrated profile and compared step by step with what
   was measured.

    python benchmarks/sim_validation.py [--out benchmarks/sim-validation.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from speckv import LLM, SamplingParams
from speckv.config import EngineConfig
from speckv.models.loaded import load_model

DATA = Path(__file__).resolve().parents[1] / "speckv" / "bench" / "data"
CELLS = {
    "resident b1": dict(batch=1), "resident b8": dict(batch=8), "resident b32": dict(batch=32),
    "int8+quest25% b8": dict(batch=8, pool="local", codec="int8", selector="quest",
                             token_budget=0.25),
    "int8+quest25% b32": dict(batch=32, pool="local", codec="int8", selector="quest",
                              token_budget=0.25),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results (JSON) here")
    ns = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="speckv-sim-"))
    loaded = load_model(EngineConfig.from_kwargs().model)
    ids = None
    calibration = tmp / "calibration.jsonl"
    llm = LLM(loaded=loaded, trace=str(calibration), enable_prefix_caching=False)
    ids = llm.tokenizer.encode((DATA / "declaration.txt").read_text() * 6)
    llm.generate([ids[i * 40: i * 40 + 64 + 8 * i] for i in range(32)],
                 [SamplingParams(temperature=0, max_tokens=4 + 4 * i,
                                 ignore_eos=True) for i in range(32)],
                 use_tqdm=False)
    llm.close()
    print("traced the calibration run", flush=True)
    text = llm.tokenizer.encode((DATA / "pride_and_prejudice_ch1.txt").read_text() * 3)
    traces = {}
    for name, cell in CELLS.items():
        cell = dict(cell)
        batch = cell.pop("batch")
        traces[name] = tmp / (name.replace(" ", "_").replace("%", "").replace("+", "_") + ".jsonl")
        llm = LLM(loaded=loaded, trace=str(traces[name]), enable_prefix_caching=False, **cell)
        llm.generate([text[i * 37: i * 37 + 512] for i in range(batch)],
                     SamplingParams(temperature=0, max_tokens=64, ignore_eos=True), use_tqdm=False)
        llm.close()
        print(f"traced {name}", flush=True)
    profile = tmp / "cpu-calibrated.json"
    speckv = [sys.executable, "-m", "speckv.cli", "simulate"]
    fit = subprocess.run(speckv + ["--trace", str(calibration), "--profile", "cpu", "--calibrate",
                                   "--save-profile", str(profile)],
                         capture_output=True, text=True, check=True).stdout.splitlines()[0]
    print(fit)
    rows = {}
    for name, trace in traces.items():
        out = tmp / "sim.json"
        subprocess.run(speckv + ["--trace", str(trace), "--profile", str(profile), "--json",
                                 str(out)], capture_output=True, check=True)
        entry = json.loads(out.read_text())["profiles"][0]
        rows[name] = {k: entry.get(k) for k in (
            "step_error_median", "step_error_max", "total_error", "decode_tokens_per_second",
            "measured_decode_tokens_per_second")}
    print(f"{'workload':<20} {'median |err|':>12} {'max |err|':>10} {'total err':>10} "
          f"{'decode tok/s proj':>18} {'measured':>9}")
    for name, r in rows.items():
        print(f"{name:<20} {100 * r['step_error_median']:11.1f}% {100 * r['step_error_max']:9.1f}% "
              f"{100 * r['total_error']:+9.1f}% {r['decode_tokens_per_second']:18.1f} "
              f"{r['measured_decode_tokens_per_second']:9.1f}")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"calibration": fit, "profile": json.loads(
            profile.read_text()), "cells": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
