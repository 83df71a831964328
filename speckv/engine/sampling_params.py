"""Per-request sampling options (OpenAI / vLLM names)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    `temperature=0` is greedy. `top_k=0` and `top_p=1` disable those filters.
    A request with a `seed` has its own random generator: the same seed and
    prompt give the same text, whatever else is in the batch.
    """

    max_tokens: int = field(default=64, metadata={"help": "most tokens to generate"})
    temperature: float = field(default=0.0, metadata={
        "help": "sampling temperature; 0 is greedy"})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens; 0: all"})
    top_p: float = field(default=1.0, metadata={
        "help": "sample from the smallest set of tokens whose probability reaches top_p, in (0, 1]"})
    seed: int | None = field(default=None, metadata={
        "help": "per-request random seed, for reproducible sampling"})
    stop: tuple[str, ...] = field(default=(), metadata={
        "help": "stop when the text contains this string (not included in the output)"})
    ignore_eos: bool = field(default=False, metadata={
        "help": "keep generating after the end-of-sequence token (for benchmarks)"})
    selector: str | None = field(default=None, metadata={
        "help": "page selector for this request (full, quest, sink_recent, oracle); "
                "default: the engine's"})
    token_budget: int | float | str | None = field(default=None, metadata={
        "help": "selection budget for this request: tokens or a fraction of the context; "
                "default: the engine's"})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.token_budget is not None:
            from speckv.config import parse_token_budget

            object.__setattr__(self, "token_budget", parse_token_budget(self.token_budget))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
