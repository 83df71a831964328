"""Engine configuration: one frozen dataclass per subsystem, composed by `EngineConfig`.

Every field is also a keyword of `LLM(...)` and an option of the CLI (`--page-size`
for `page_size`), so scripts, the CLI and the server share one configuration. The
`help` metadata of a field is its CLI help text; a field that names a plugin says
which kind (`plugin` metadata), and the CLI lists the registered names.

This module is a leaf: it checks the form of every value but imports no subsystem.
Whether a named codec, pool backend, selector, eviction policy or predictor exists is
checked against the registries by `speckv.plugins.check_names`, which the engine
calls before it loads any weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from speckv.util import format_size, is_int, parse_size  # noqa: F401  (re-exported)

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "bfloat16"]
WeightQuant = Literal["auto", "none", "int8", "int4"]
AttentionBackend = Literal["auto", "torch", "cpu_kernel"]
KVRead = Literal["auto", "in_place", "copy"]


def _choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which weights to run, where, and in which precision."""

    model: str | None = field(default=None, metadata={
        "help": "model to load: a .gguf file, or a directory with an HF config.json and "
                "*.safetensors (Llama family); default: the bundled SmolLM2-135M-Instruct"})
    device: Device = field(default="auto", metadata={
        "help": "where the model and the KV cache live: cpu, cuda, or auto (cuda when "
                "available)"})
    dtype: DType = field(default="float32", metadata={
        "help": "compute and KV dtype; float32 is the measured fastest on CPU "
                "(see BENCHMARKS.md), bfloat16 halves weight and KV memory"})
    weight_quant: WeightQuant = field(default="auto", metadata={
        "help": "weights: auto (default) keeps a GGUF's Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K "
                "(and Q5_0, held as Q8_0) matrices quantized, the same numbers, and "
                "multiplies them with a weight-only kernel, activations in "
                "float32 (CPU, float32 dtype; elsewhere: as none); none expands every "
                "weight to dtype at load; int8 / int4 also quantize float weights "
                "(Q8_0 / Q4_1, 32 weights per scale)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "context window in tokens (prompt + generated); default: the model's"})
    threads: int = field(default=0, metadata={
        "help": "compute threads; 0 (default): automatic, as many as there are cores that "
                "other processes leave free, re-checked every second (a busy neighbour "
                "then costs speed in proportion, instead of stalling every barrier)"})

    def __post_init__(self) -> None:
        if not is_int(self.threads) or self.threads < 0:
            raise ValueError(f"threads must be an integer >= 0 (0: automatic), got {self.threads!r}")
        _choice(self.device, "device", ("auto", "cpu", "cuda"))
        _choice(self.dtype, "dtype", ("float32", "bfloat16"))
        _choice(self.weight_quant, "weight_quant", ("auto", "none", "int8", "int4"))
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """The paged KV cache in fast memory (the DEVICE tier)."""

    page_size: int = field(default=16, metadata={
        "help": "tokens per KV page (one sequence, one layer, all KV heads)"})
    device_kv_bytes: int | str = field(default="1GiB", metadata={
        "help": "byte budget of the DEVICE tier, preallocated at start; human sizes "
                "such as 256MiB or 2GiB are accepted"})
    attention_backend: AttentionBackend = field(default="auto", metadata={
        "help": "decode attention: torch (gather pages, then SDPA; any device), cpu_kernel "
                "(C++ kernels reading pages in place, and fetching pool pages in one pass "
                "for codecs none and int8; CPU float32; compiled on first use), auto "
                "(cpu_kernel on CPU float32, torch otherwise)"})
    kv_read: KVRead = field(default="auto", metadata={
        "help": "how attention reads pooled pages: in_place (where they lie, a pool row "
                "decoded in registers as the kernel streams it; nothing is copied into "
                "DEVICE, which then holds only the pages not yet pooled; needs the CPU "
                "kernels and codec none, int8 or kivi4; predictors' hints become software "
                "prefetches of the rows into the CPU caches), copy (into DEVICE slots "
                "first, prefetched ahead into the PREFETCH tier; any device and codec), "
                "auto (in_place where it can, copy otherwise, e.g. on CUDA)"})
    enable_prefix_caching: bool = field(default=True, metadata={
        "help": "share sealed pages by content: a prompt that starts like an earlier one "
                "(a system prompt, the history of a chat) reuses its cached pages and "
                "prefills only the rest; pages of finished requests stay cached (least "
                "recently used dropped first) until their room is needed. Off: every "
                "prompt is prefilled in full. Requests opt out with cache_prompt=false"})

    def __post_init__(self) -> None:
        _choice(self.kv_read, "kv_read", ("auto", "in_place", "copy"))
        if not 1 <= self.page_size <= 4096:
            raise ValueError(f"page_size must be in [1, 4096], got {self.page_size}")
        _choice(self.attention_backend, "attention_backend", ("auto", "torch", "cpu_kernel"))
        size = parse_size(self.device_kv_bytes)
        if size <= 0:
            raise ValueError(f"device_kv_bytes must be > 0, got {self.device_kv_bytes!r}")
        object.__setattr__(self, "device_kv_bytes", size)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """The POOL tier: where sealed pages go, encoded, when DEVICE is not enough."""

    pool: str = field(default="none", metadata={
        "plugin": "pool",
        "help": "capacity tier for sealed KV pages: none (every page stays in DEVICE), "
                "local (host memory of this process), memnode (a memory-node process; "
                "see `speckv memnode`), valkey (local, and prefix-cached pages shared with "
                "other engines through a Valkey/Redis server: --pool-url)"})
    pool_bytes: int | str = field(default="4GiB", metadata={
        "help": "capacity of the pool (local, valkey), or of the memory node the engine "
                "spawns; with pool=valkey and no pool_url, also the memory of the Valkey "
                "server the engine starts"})
    pool_url: str | None = field(default=None, metadata={
        "help": "Valkey/Redis server shared by engines (pool=valkey): "
                "valkey://[user:password@]host:port[/db], valkeys:// (TLS; ?ca=FILE), "
                "unix:///path.sock?password=..., valkey+cluster://host:port (a cluster); "
                "default: the engine starts a private "
                "local one (loopback, random password), shared with nobody"})
    valkey_timeout: float = field(default=2.0, metadata={
        "help": "seconds any call to Valkey may take before it counts as unavailable "
                "(requests go on: lookups miss, pages are not shared until it is back)"})
    codec: str = field(default="none", metadata={
        "plugin": "codec",
        "help": "how pages are encoded in the pool, optionally with a lossless stage on "
                "top (e.g. int8+zstd)"})
    residual_tokens: int = field(default=0, metadata={
        "help": "most recent tokens of a sequence kept unencoded in DEVICE (their pages "
                "are stored only once older)"})
    keep_sink_page: bool = field(default=False, metadata={
        "help": "keep each sequence's first page (the attention sink) unencoded in DEVICE"})
    eviction: str = field(default="lru", metadata={
        "plugin": "eviction",
        "help": "which pooled pages leave DEVICE first"})
    memnode_socket: str | None = field(default=None, metadata={
        "help": "control socket of a running memory node (pool=memnode); default: the "
                "engine spawns its own node of pool_bytes and stops it on exit"})
    memnode_timeout: float = field(default=5.0, metadata={
        "help": "seconds any call to the memory node may take (connect included) before the "
                "node counts as unavailable and the requests holding its pages fail"})
    link: str | None = field(default=None, metadata={
        "help": "link model for memnode transfers: none, cxl2-x16, cxl3-x16, pcie4-x16, "
                "pcie5-x16 or custom:<GB/s>,<ns>; default: the node's own --link"})
    pool_numa_node: int | None = field(default=None, metadata={
        "help": "bind the local pool's memory to this NUMA node (a CXL expander appears "
                "as one)"})

    def __post_init__(self) -> None:
        for name in ("pool", "codec", "eviction"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a name, got {getattr(self, name)!r}")
        size = parse_size(self.pool_bytes)
        if size <= 0:
            raise ValueError(f"pool_bytes must be > 0, got {self.pool_bytes!r}")
        object.__setattr__(self, "pool_bytes", size)
        if self.residual_tokens < 0:
            raise ValueError(f"residual_tokens must be >= 0, got {self.residual_tokens}")
        if self.pool == "none" and self.codec != "none":
            raise ValueError(f"codec={self.codec!r} encodes pages for a pool, but pool='none': "
                             "choose pool='local' or pool='memnode'")
        if not 0 < self.memnode_timeout <= 3600:
            raise ValueError(f"memnode_timeout must be in (0, 3600] seconds, got {self.memnode_timeout}")
        if self.pool != "memnode" and (self.memnode_socket is not None or self.link is not None):
            raise ValueError("memnode_socket and link apply to pool='memnode' only")
        if self.pool not in ("local", "valkey") and self.pool_numa_node is not None:
            raise ValueError("pool_numa_node applies to pool='local' or 'valkey' only")
        if self.pool != "valkey" and self.pool_url is not None:
            raise ValueError("pool_url applies to pool='valkey' only")
        if not 0 < self.valkey_timeout <= 3600:
            raise ValueError(f"valkey_timeout must be in (0, 3600] seconds, got {self.valkey_timeout}")
        if self.pool == "valkey" and self.keep_sink_page:
            raise ValueError("pool='valkey' shares pages stored in the pool, and keep_sink_page "
                             "keeps every prompt's first page out of it (so no prefix could be "
                             "shared): turn one of them off")


def parse_token_budget(value: int | float | str) -> int | float:
    """A selection budget: whole tokens (an int >= 1) or a fraction of the context in (0, 1].

    Raises:
        ValueError: for zero, a negative value, a fraction above 1, or text that is neither.
    """
    if isinstance(value, bool):
        raise ValueError(f"token_budget must be tokens or a fraction, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            raise ValueError(f"token_budget must be tokens (e.g. 512) or a fraction of the "
                             f"context (e.g. 0.25), got {value!r}") from None
    if isinstance(value, float) and value.is_integer() and value > 1:
        value = int(value)
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"token_budget must be >= 1 token, got {value}")
        return value
    if not 0 < value <= 1:
        raise ValueError(f"token_budget as a fraction must be in (0, 1], got {value}")
    return float(value)


@dataclass(frozen=True, slots=True)
class SelectionConfig:
    """Query-aware page selection: which sealed pages decode attention reads."""

    selector: str = field(default="full", metadata={
        "plugin": "selector",
        "help": "page selector for decode attention: full (default: exact), centroid "
                "(recommended sparse one: page mean keys, each query head's best pages), "
                "subpage (centroid over --summary-slices slices of each page: tells apart "
                "similar pages, e.g. several keys of one kind; needs --summary-slices > 1), "
                "twilight (centroid with an adaptive budget: pages until 90%% of the "
                "estimated attention mass, the token budget as the cap), quest (key-bound "
                "scores, top pages), sink_recent (first page + most recent), oracle (true "
                "top pages; evaluation only); overridable per request"})
    token_budget: int | float | str = field(default=0.25, metadata={
        "help": "tokens a selector keeps per sequence, KV head and layer: whole tokens "
                "(512) or a fraction of the context (0.25); the sink and open pages "
                "count towards it"})
    dense_layers: int = field(default=2, metadata={
        "help": "first layers that always attend every page (Quest keeps 2)"})
    keep_sink: bool = field(default=True, metadata={
        "help": "always keep each sequence's first page (the attention sink)"})
    min_context_tokens: int = field(default=256, metadata={
        "help": "queries whose context is shorter than this attend every page (a 25%% "
                "budget of a short context is a page or two: measured +4.4%% perplexity "
                "at 0, -0.2%% at 256; see BENCHMARKS.md)"})
    summary_slices: int = field(default=1, metadata={
        "help": "mean keys kept per page and KV head in fast memory (each of an equal "
                "slice of the page): 1 = the page's mean key (centroid, twilight); more "
                "lets the subpage selector rank a page by its best slice, at one more "
                "row of head_dim per slice (4 at 16-token pages: summaries 19%% of the "
                "KV bytes instead of 9%%); must divide page_size"})
    selection_eval: bool = field(default=False, metadata={
        "help": "evaluation mode: also measure each selection's attention-mass recall "
                "and overlap with the oracle (costs a full attention per layer)"})

    def __post_init__(self) -> None:
        if not isinstance(self.selector, str) or not self.selector:
            raise ValueError(f"selector must be a name, got {self.selector!r}")
        object.__setattr__(self, "token_budget", parse_token_budget(self.token_budget))
        if self.dense_layers < 0:
            raise ValueError(f"dense_layers must be >= 0, got {self.dense_layers}")
        if self.min_context_tokens < 0:
            raise ValueError(f"min_context_tokens must be >= 0, got {self.min_context_tokens}")
        if self.summary_slices < 1:
            raise ValueError(f"summary_slices must be >= 1, got {self.summary_slices}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = field(default=32, metadata={
        "help": "most sequences in one step (the running batch)"})
    max_num_batched_tokens: int = field(default=2048, metadata={
        "help": "most tokens computed in one step; longer prompts are prefilled in "
                "chunks of this size"})

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs one "
                "token per decode step")


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """The prefetcher: which predictors guess the pages of coming layers and steps, and
    the PREFETCH tier's byte budget (separate from DEVICE's)."""

    predictor: str = field(default="none", metadata={
        "plugin": "predictor",
        "help": "prefetch predictors, comma-separated (e.g. layer_ahead,step_ahead); "
                "needs a pool. kv_read copy: hinted pages are copied into the PREFETCH "
                "tier; in place: their rows are software-prefetched into the CPU caches"})
    prefetch_bytes: int | str = field(default="64MiB", metadata={
        "help": "byte budget of the PREFETCH tier (decoded pages fetched ahead; spare "
                "slots of DEVICE's tensor, allocated whenever there is a pool); a wrong "
                "guess never evicts a DEVICE page"})
    prefetch_depth: int = field(default=1, metadata={
        "help": "how many layers ahead a prediction is issued"})
    trace: str | None = field(default=None, metadata={
        "help": "write one JSON line per engine step (time, stall, prefetch counts, bytes) "
                "to this file"})

    def __post_init__(self) -> None:
        names = tuple(n.strip() for n in self.predictor.split(","))
        if not all(names):
            raise ValueError(f"predictor={self.predictor!r} has an empty name; write e.g. "
                             "'layer_ahead' or 'layer_ahead,step_ahead'")
        if "none" in names and len(names) > 1:
            raise ValueError(f"predictor={self.predictor!r}: 'none' cannot be combined")
        size = parse_size(self.prefetch_bytes)
        if size < 0:
            raise ValueError(f"prefetch_bytes must be >= 0, got {self.prefetch_bytes!r}")
        object.__setattr__(self, "prefetch_bytes", size)
        if self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be >= 1, got {self.prefetch_depth}")

    @property
    def predictors(self) -> tuple[str, ...]:
        """The predictor names; empty for none."""
        names = tuple(n.strip() for n in self.predictor.split(","))
        return () if names == ("none",) else names


@dataclass(frozen=True, slots=True)
class SamplerConfig:
    """The engine's own randomness."""

    engine_seed: int = field(default=0, metadata={
        "help": "seed of the engine's generator, used by requests that have no seed of "
                "their own"})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine is built from; composed of the subsystem configs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.pool.pool == "valkey" and not self.cache.enable_prefix_caching:
            raise ValueError("pool='valkey' shares prefix-cached pages between engines: it "
                             "needs enable_prefix_caching (or use pool='local')")
        if self.cache.page_size % self.selection.summary_slices:
            raise ValueError(f"summary_slices ({self.selection.summary_slices}) must divide "
                             f"page_size ({self.cache.page_size})")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Builds a config from flat keywords (`page_size=32`), routed to their subsystem.

        Raises:
            ValueError: for an unknown keyword (the known ones are listed) or a bad value.
        """
        parts: dict[str, dict[str, Any]] = {name: {} for name in SUBSYSTEMS}
        for key, value in kwargs.items():
            if key in VLLM_ALIASES:  # vLLM's name for the same option
                if VLLM_ALIASES[key] in kwargs:
                    raise ValueError(f"give {key} (vLLM's name) or {VLLM_ALIASES[key]}, "
                                     "not both")
                key = VLLM_ALIASES[key]
            if key in VLLM_DIFFERENT:
                raise ValueError(f"{key!r} is vLLM's option; {VLLM_DIFFERENT[key]}")
            owner = _FIELD_OWNER.get(key)
            if owner is None:
                known = ", ".join(sorted(_FIELD_OWNER))
                raise ValueError(f"unknown engine option {key!r}; known options: {known}")
            parts[owner][key] = value
        return cls(**{name: SUBSYSTEMS[name](**parts[name]) for name in SUBSYSTEMS})


SUBSYSTEMS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "pool": PoolConfig,
    "selection": SelectionConfig,
    "prefetch": PrefetchConfig,
    "scheduler": SchedulerConfig,
    "sampler": SamplerConfig,
}

VLLM_ALIASES = {"block_size": "page_size", "seed": "engine_seed"}
"""vLLM's LLM() keywords that mean what speckv's option of another name means."""

VLLM_DIFFERENT = {
    "gpu_memory_utilization": "speckv sizes fast memory in bytes, not as a fraction of a "
                              "GPU's: device_kv_bytes='4GiB' is the KV cache's DEVICE tier "
                              "(a CPU has no device memory to take a fraction of)",
    "swap_space": "speckv's capacity tier is the pool: pool='local', pool_bytes='8GiB'",
    "tensor_parallel_size": "speckv runs one model on one device (no tensor parallelism)",
}
"""vLLM's LLM() keywords without a same-meaning speckv option, and what to use."""

_FIELD_OWNER: dict[str, str] = {
    f.name: sub for sub, cls in SUBSYSTEMS.items() for f in dataclasses.fields(cls)
}
