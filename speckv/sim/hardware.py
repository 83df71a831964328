"""Hardware profiles: the figures a projection runs on, each with its source.

A profile is a JSON file (`speckv/sim/profiles/*.json`, or a path given to `load`):

    name                  str
    kind                  "gpu", "cpu" or "memory" (a memory tier: no compute)
    memory_gb             float > 0   capacity, 1e9 bytes
    memory_bandwidth_gbs  float > 0   sustained read bandwidth, 1e9 bytes/s
    peak_tflops           {dtype: float > 0}, dtype in bfloat16 / float16 / float32
                          (gpu and cpu only; dense, no sparsity)
    step_overhead_us      float >= 0  fixed cost of one engine step (launches,
                          framework)
    sequence_overhead_us  float >= 0  cost per decoding sequence per step (optional)
    token_overhead_us     float >= 0  cost per computed token (optional)
    kv_token_overhead_us  float >= 0  cost per past token a decode reads (optional)
                          (the three overheads are what the roofline leaves out; for a
                          CPU, `speckv simulate --calibrate` fits them on a trace)
    sources               [str, ...]  where each figure comes from (required)

Field names carry their units; anything else is refused by name. Links between a
device and a pool are `speckv.pool.link`'s profiles (cxl2-x16, pcie5-x16, ...: the
same figures the engine's `--link` waits on, with their sources there). `probe_cpu`
measures this machine: memory bandwidth (a large copy) and float32/bfloat16 GEMM.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

KINDS = ("gpu", "cpu", "memory")
DTYPES = ("bfloat16", "float16", "float32")
OVERHEADS = ("step_overhead_us", "sequence_overhead_us", "token_overhead_us",
             "kv_token_overhead_us")
_FIELDS = {"name", "kind", "memory_gb", "memory_bandwidth_gbs", "peak_tflops", *OVERHEADS,
           "sources"}


@dataclass(frozen=True, slots=True)
class Hardware:
    name: str
    kind: str
    memory_gb: float
    memory_bandwidth_gbs: float
    peak_tflops: dict[str, float] = field(default_factory=dict)
    step_overhead_us: float = 0.0
    sequence_overhead_us: float = 0.0
    token_overhead_us: float = 0.0
    kv_token_overhead_us: float = 0.0
    sources: tuple[str, ...] = ()

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (ValueError if the profile has none)."""
        if dtype not in self.peak_tflops:
            raise ValueError(f"{self.name} has no peak for {dtype} (it lists "
                             f"{', '.join(self.peak_tflops) or 'none: a memory tier'})")
        return self.peak_tflops[dtype] * 1e12

    @property
    def bandwidth(self) -> float:
        return self.memory_bandwidth_gbs * 1e9

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "memory_gb": self.memory_gb,
                "memory_bandwidth_gbs": self.memory_bandwidth_gbs,
                "peak_tflops": dict(self.peak_tflops),
                **{k: getattr(self, k) for k in OVERHEADS}, "sources": list(self.sources)}


def _positive(where: str, name: str, value: object, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero):
        raise ValueError(f"{where}: {name} must be a number {'>=' if zero else '>'} 0, got {value!r}")
    return float(value)


def validate(data: object, where: str = "profile") -> Hardware:
    """A profile from its JSON object; ValueError naming the first bad or missing field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a profile is a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(_FIELDS))}; units are in the names)")
    for name in ("name", "kind", "memory_gb", "memory_bandwidth_gbs", "sources"):
        if name not in data:
            raise ValueError(f"{where}: {name} is required")
    if not isinstance(data["name"], str) or not data["name"]:
        raise ValueError(f"{where}: name must be a non-empty string")
    if data["kind"] not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, got {data['kind']!r}")
    sources = data["sources"]
    if not isinstance(sources, list) or not sources or \
            not all(isinstance(s, str) and s.strip() for s in sources):
        raise ValueError(f"{where}: sources must list where the figures come from")
    peaks = data.get("peak_tflops", {})
    if data["kind"] != "memory" and not peaks:
        raise ValueError(f"{where}: a {data['kind']} needs peak_tflops")
    if not isinstance(peaks, dict) or any(k not in DTYPES for k in peaks):
        raise ValueError(f"{where}: peak_tflops maps {', '.join(DTYPES)} to TFLOP/s")
    return Hardware(
        name=data["name"], kind=data["kind"],
        memory_gb=_positive(where, "memory_gb", data["memory_gb"]),
        memory_bandwidth_gbs=_positive(where, "memory_bandwidth_gbs",
                                       data["memory_bandwidth_gbs"]),
        peak_tflops={k: _positive(where, f"peak_tflops.{k}", v) for k, v in peaks.items()},
        **{k: _positive(where, k, data.get(k, 0.0), zero=True) for k in OVERHEADS},
        sources=tuple(sources))


def shipped() -> dict[str, Path]:
    """The shipped profiles: lowercase name -> file."""
    folder = resources.files("speckv.sim") / "profiles"
    return {p.name.removesuffix(".json"): Path(str(p)) for p in folder.iterdir()
            if p.name.endswith(".json")}


def load(spec: str) -> Hardware:
    """A shipped profile by name (`h100-80gb-sxm`), `cpu` (probed now), or a JSON file."""
    if spec == "cpu":
        return probe_cpu()
    files = shipped()
    path = files.get(spec.lower()) or Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown hardware profile {spec!r}: give a file, 'cpu' (this machine, "
                         f"probed), or one of {', '.join(sorted(files))}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the profile {path}: {exc}") from exc
    return validate(data, str(path))


def probe_cpu(seconds: float = 1.0) -> Hardware:
    """This machine, measured: memory bandwidth (a 256 MiB copy, read + write counted as
    the bytes read), float32 and bfloat16 GEMM (512 x 576 x 1536, the shapes of a prefill
    on the bundled model), each the median of repeats within `seconds`; 2 cores' worth."""
    import os

    import torch

    def median_time(fn) -> float:
        fn()
        times, deadline = [], time.perf_counter() + seconds / 3
        while len(times) < 5 or time.perf_counter() < deadline:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    src = torch.empty(32 << 20, dtype=torch.float64)  # 256 MiB
    dst = torch.empty_like(src)
    src.fill_(1.0)
    copy_s = median_time(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 8 / copy_s  # each byte read once and written once
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 576).to(dtype)
        b = torch.randn(576, 1536).to(dtype)
        peaks[str(dtype).removeprefix("torch.")] = 2 * 512 * 576 * 1536 / median_time(
            lambda: a @ b) / 1e12
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(
        name=f"cpu ({torch.get_num_threads()} threads)", kind="cpu", memory_gb=total / 1e9,
        memory_bandwidth_gbs=bandwidth / 1e9, peak_tflops=peaks, step_overhead_us=0.0,
        sources=(f"measured on this machine by speckv.sim.hardware.probe_cpu, "
                 f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",))
