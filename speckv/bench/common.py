"""What the benchmarks share: isolated runs, the machine's description, option parsing."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
from datetime import date
from importlib import resources
from typing import Any, Callable

import torch


def in_subprocess(fn: Callable, *args) -> Any:
    """Runs `fn(*args)` in a fresh spawned process (its own peak RSS, no shared state)."""
    # TQDM_DISABLE: transformers' GGUF dequantization bar ignores its own progress-bar
    # switch, and tqdm reads the variable when it is first imported, i.e. in the child.
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        pool = mp.get_context("spawn").Pool(1)
        try:
            return pool.apply(fn, args)
        finally:
            pool.close()  # a clean exit; terminate() leaves semaphores to the tracker
            pool.join()
    finally:
        if previous is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = previous


def machine() -> str:
    """The CPU (its model name where /proc/cpuinfo has one), cores, torch, and which
    instruction-set build of the weight-only kernel runs here."""
    from speckv.kv.cpu_kernels import cpu_model
    from speckv.models.quant import _kernels_if_built

    kernels = _kernels_if_built()
    isa = kernels.quant_matmul_isa() if kernels is not None else "not built"
    return (f"{platform.machine()} {cpu_model()}, {mp.cpu_count()} cpus, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), kernels {isa}")


def parse_options(text: str, flag: str = "--variant") -> dict[str, Any]:
    """`"a=1,b=x"` -> `{"a": 1, "b": "x"}` (ints stay ints)."""
    changed: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} wants KEY=VALUE[,KEY=VALUE], got {text!r}")
        changed[key.strip()] = int(value) if value.strip().isdigit() else value.strip()
    return changed


def parse_ints(text: str, flag: str) -> list[int]:
    """`"1,8,32"` -> [1, 8, 32]; every value an integer >= 1, else a ValueError naming `flag`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} wants comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} wants integers >= 1, got {text!r}")
    return values


def bench_text() -> str:
    """The public-domain natural-language text of the fidelity benchmarks (~2.8k tokens)."""
    data = resources.files("speckv.bench") / "data"
    parts = [(data / name).read_text(encoding="utf-8")
             for name in ("declaration.txt", "pride_and_prejudice_ch1.txt")]
    return "\n\n".join(parts)


def publish(fields: dict[str, Any], format_table: Callable[[dict], str], json_path: str | None) -> dict:
    """Dates and signs a benchmark report, prints its table and writes its JSON."""
    report = {"date": date.today().isoformat(), "machine": machine(), **fields}
    print(format_table(report))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    return report
