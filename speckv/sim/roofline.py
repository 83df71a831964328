"""The step model: what one engine step costs on a hardware profile, mechanism by mechanism.

A step computes `tokens` new tokens (prefill chunks and one per decoding sequence) and
reads the KV of `kv_tokens` past tokens (the decoding sequences' contexts) plus
`prefill_pairs` query-key pairs of its prefill chunks. On a device of bandwidth BW and
peak P (for the compute dtype):

    weights   = weight_bytes / BW                       every matrix is read once a step
    kv        = kv_tokens * f_sel * kv_bytes_per_token / BW
                + summary reads (kv_tokens / page_size * summary_bytes, when f_sel < 1)
    compute   = (2 * matmul_params * tokens
                 + 4 * layers * heads * head_dim * (kv_tokens * f_sel + prefill_pairs)) / P
    core      = max(weights + kv, compute)              the roofline: one of them binds

KV that lives in a pool behind a link (`pooled_fraction` of what a step reads) crosses
the link each step, in the codec's bytes (`codec_ratio` = stored / raw bytes):

    needed    = kv_tokens * f_sel * pooled_fraction * kv_bytes_per_token * codec_ratio
    ahead     = needed * recall / precision              moved before it is asked for
    demand    = needed * (1 - recall)                     moved when asked (a stall)
    link(b)   = b / link_bandwidth, + one latency per layer for demand reads
    decode(b) = b / codec_decode_rate (0 when the codec decodes at line rate)
    transfer(b) = max(link(b), decode(b))                 link and decoder pipeline
    hidden    = min(transfer(ahead), core)                prefetch overlaps the step
    exposed   = transfer(ahead) - hidden + transfer(demand)

    overhead  = step_overhead + sequence_overhead * decode_sequences
                + token_overhead * tokens + kv_token_overhead * kv_tokens * f_sel
                                                        what the roofline leaves out
    step      = core + exposed + overhead

`recall` is the predictor's fraction of needed pages that were fetched ahead (its
hits), `precision` the fraction of fetched pages that were used (so 1/precision is
the traffic per useful byte). Everything is per step; a workload is the sum of its
steps. What this does not model: queueing between requests, the PCIe/CXL link's
protocol efficiency beyond the profile's figure, contention for the memory bus by
the link's writes, and kernel efficiency below the roofline (a profile's peak is
its datasheet's; the CPU profile's is what its probe measured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from speckv.pool.link import LinkProfile
from speckv.sim.hardware import Hardware
from speckv.sim.shapes import ModelShape


@dataclass(frozen=True, slots=True)
class Mechanisms:
    """What the engine does to KV and weights, as the step model sees it."""

    weight_bytes: float  # bytes of weights a step streams (format included)
    kv_element_bytes: float = 2.0  # per K or V element in fast memory (bf16: 2)
    compute_dtype: str = "bfloat16"
    page_size: int = 16
    selection_fraction: float = 1.0  # fraction of the KV pages a decode step reads
    summary_bytes_per_page: float = 0.0  # over all layers, read when selection is on
    pooled_fraction: float = 0.0  # of the KV a step reads, what lives behind the link
    codec_ratio: float = 1.0  # stored bytes / raw bytes of a pooled page
    codec_decode_gbs: float | None = None  # decode rate of the codec; None: line rate
    link: LinkProfile | None = None
    prefetch_recall: float = 0.0  # needed pooled pages fetched ahead
    prefetch_precision: float = 1.0  # fetched pages that were used

    def __post_init__(self) -> None:
        for name in ("selection_fraction", "pooled_fraction", "prefetch_recall"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.prefetch_precision <= 1:
            raise ValueError(f"prefetch_precision must be in (0, 1], got {self.prefetch_precision}")
        if self.codec_ratio <= 0 or self.weight_bytes < 0 or self.kv_element_bytes <= 0:
            raise ValueError("codec_ratio and kv_element_bytes must be > 0, weight_bytes >= 0")
        if self.pooled_fraction > 0 and self.link is None:
            raise ValueError("pooled_fraction > 0 needs a link between the device and the pool")
        if self.codec_decode_gbs is not None and self.codec_decode_gbs <= 0:
            raise ValueError(f"codec_decode_gbs must be > 0, got {self.codec_decode_gbs}")


@dataclass(frozen=True, slots=True)
class Step:
    """One engine step's work."""

    tokens: int  # tokens computed (prefill chunks + one per decoding sequence)
    kv_tokens: int = 0  # past tokens whose KV the decoding sequences read
    prefill_pairs: int = 0  # query-key pairs of the prefill chunks (causal)
    decode_sequences: int = 0


@dataclass(frozen=True, slots=True)
class Breakdown:
    """Seconds of one step (or of a workload, summed), by where they go."""

    weights: float = 0.0
    kv: float = 0.0
    compute: float = 0.0
    core: float = 0.0
    transfer: float = 0.0  # link + decode, all of it
    hidden: float = 0.0  # of transfer, under the core
    exposed: float = 0.0  # of transfer, added to the step
    overhead: float = 0.0
    total: float = 0.0
    link_bytes: float = 0.0

    def __add__(self, other: "Breakdown") -> "Breakdown":
        return Breakdown(**{k: getattr(self, k) + getattr(other, k)
                            for k in self.__dataclass_fields__})

    def as_dict(self) -> dict:
        return asdict(self)


def step_time(shape: ModelShape, hw: Hardware, mech: Mechanisms, step: Step) -> Breakdown:
    """The step model above, for one step."""
    bw = hw.bandwidth
    kvb = shape.kv_bytes_per_token(mech.kv_element_bytes)
    read_tokens = step.kv_tokens * mech.selection_fraction
    weights = mech.weight_bytes / bw
    kv = read_tokens * kvb / bw
    if mech.selection_fraction < 1:
        kv += step.kv_tokens / mech.page_size * mech.summary_bytes_per_page / bw
    flops = 2 * shape.matmul_params * step.tokens + 4 * shape.layers * shape.heads \
        * shape.head_dim * (read_tokens + step.prefill_pairs)
    compute = flops / hw.flops(mech.compute_dtype)
    core = max(weights + kv, compute)
    needed = read_tokens * mech.pooled_fraction * kvb * mech.codec_ratio
    ahead = needed * mech.prefetch_recall / mech.prefetch_precision
    demand = needed * (1 - mech.prefetch_recall)
    ahead_s = _transfer(mech, ahead, demand=False, layers=shape.layers)
    demand_s = _transfer(mech, demand, demand=True, layers=shape.layers)
    hidden = min(ahead_s, core)
    exposed = ahead_s - hidden + demand_s
    overhead = (hw.step_overhead_us + hw.sequence_overhead_us * step.decode_sequences
                + hw.token_overhead_us * step.tokens
                + hw.kv_token_overhead_us * read_tokens) * 1e-6
    return Breakdown(weights=weights, kv=kv, compute=compute, core=core,
                     transfer=ahead_s + demand_s, hidden=hidden, exposed=exposed,
                     overhead=overhead, total=core + exposed + overhead,
                     link_bytes=ahead + demand)


def _transfer(mech: Mechanisms, nbytes: float, demand: bool, layers: int) -> float:
    if nbytes <= 0 or mech.link is None:
        return 0.0
    link = nbytes / (mech.link.bandwidth_gbs * 1e9)
    if demand:  # a stall per layer that misses: its round trip is not hidden
        link += layers * mech.link.latency_ns * 1e-9
    decode = 0.0 if mech.codec_decode_gbs is None else nbytes / (mech.codec_decode_gbs * 1e9)
    return max(link, decode)


def decode_steps(batch: int, context: int, generate: int) -> list[Step]:
    """A batch of `batch` sequences decoding `generate` tokens after `context` each."""
    return [Step(tokens=batch, kv_tokens=batch * (context + i), decode_sequences=batch)
            for i in range(generate)]


def prefill_step(batch: int, context: int) -> Step:
    """Prefilling `batch` prompts of `context` tokens in one step."""
    return Step(tokens=batch * context, prefill_pairs=batch * context * (context + 1) // 2)


def total(shape: ModelShape, hw: Hardware, mech: Mechanisms, steps: list[Step]) -> Breakdown:
    out = Breakdown()
    for step in steps:
        out = out + step_time(shape, hw, mech, step)
    return out
