"""Per-request sampling options (OpenAI / vLLM names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from speckv.util import is_int, is_number

# Below this temperature sampling is greedy: float32 logits divided by it are already
# one-hot after softmax, and far smaller values (1e-300) would divide by zero.
GREEDY_BELOW = 1e-5
SEED_RANGE = 2**64  # seeds are taken modulo this (torch generators take 64 bits)
MAX_LOGPROBS = 20  # most alternatives per token `logprobs` may ask for (vLLM's default)
MAX_N = 128  # most choices (n, best_of) of one request


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens for one request, and when to stop.

    Defaults are vLLM's (temperature 1.0: sampled; max_tokens 16); until 2026-12-03
    they were greedy and 64 tokens, which `speckv generate` keeps as its own defaults.
    `temperature=0` is greedy, and so is any temperature below `GREEDY_BELOW`
    (1e-5). `top_k=0` and `top_p=1` disable those filters; a `top_k` above the
    vocabulary keeps it all, and the most likely token always survives `top_p`, so
    no value in range can leave nothing to sample. A request with a `seed` has its
    own random generator (seed modulo 2**64): the same seed and prompt give the same
    text, whatever else is in the batch. With `n > 1`, choice i draws from seed + i,
    so each choice is reproducible on its own.

    Log probabilities (`logprobs`, `prompt_logprobs`) are the model's own
    distribution — log-softmax of the raw logits, before penalties, bias and
    temperature (vLLM's default, "raw_logprobs") — so they do not depend on how a
    token was picked.
    """

    max_tokens: int = field(default=16, metadata={"help": "most tokens to generate",
                                                  "cli_default": 64})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature; 0 is greedy", "cli_default": 0.0})
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
    presence_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the logit of every token already generated, in [-2, 2]"})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "subtracted per occurrence from the logit of each generated token, in [-2, 2]"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "divides positive (multiplies negative) logits of tokens in the prompt or "
                "output; 1 is off, > 1 discourages repeats"})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens whose probability is below min_p times the top one's, in [0, 1]"})
    logit_bias: dict[int, float] | None = field(default=None, metadata={
        "help": "token id -> bias added to its logit, each in [-100, 100]", "cli": False})
    stop_token_ids: tuple[int, ...] = field(default=(), metadata={
        "help": "stop when one of these token ids is generated (it stays in token_ids)"})
    min_tokens: int = field(default=0, metadata={
        "help": "generate at least this many tokens before EOS or a stop token may end it"})
    n: int = field(default=1, metadata={
        "help": f"completions (choices) to generate for the prompt, 1..{MAX_N}; they share "
                "the prompt's cached pages"})
    best_of: int | None = field(default=None, metadata={
        "help": "generate this many choices (>= n) and return the n with the highest "
                "cumulative log probability; default n"})
    logprobs: int | None = field(default=None, metadata={
        "help": f"return each generated token's log probability and those of the "
                f"logprobs most likely tokens (0..{MAX_LOGPROBS}); default none"})
    prompt_logprobs: int | None = field(default=None, metadata={
        "help": f"return each prompt token's log probability and those of the most likely "
                f"ones (0..{MAX_LOGPROBS}); such a request computes its whole prompt"})
    guided_json: dict | bool | None = field(default=None, metadata={
        "help": "hold the output to this JSON schema (a dict), or to any JSON object "
                "(True); llguidance", "cli": False})
    guided_regex: str | None = field(default=None, metadata={
        "help": "hold the output to this regular expression (llguidance)"})
    cache_prompt: bool = field(default=True, metadata={
        "help": "reuse cached pages of the prompt and cache this request's pages for later "
                "ones (with the engine's prefix caching on; llama.cpp's name)"})

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("ignore_eos", "cache_prompt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.token_budget is not None:
            from speckv.config import parse_token_budget

            object.__setattr__(self, "token_budget", parse_token_budget(self.token_budget))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if not is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got "
                             f"{self.repetition_penalty!r}")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or any(
                    not is_int(k) or k < 0 or not is_number(v) or not -100 <= v <= 100
                    for k, v in self.logit_bias.items()):
                raise ValueError("logit_bias must map token ids (integers >= 0) to numbers in "
                                 f"[-100, 100], got {self.logit_bias!r}")
            object.__setattr__(self, "logit_bias", dict(self.logit_bias) or None)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (integers >= 0), got "
                             f"{self.stop_token_ids!r}")
        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.best_of is not None and (not is_int(self.best_of)
                                         or not self.n <= self.best_of <= MAX_N):
            raise ValueError(f"best_of must be an integer in [n, {MAX_N}] (n={self.n}), got "
                             f"{self.best_of!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or "
                                 f"None, got {value!r}")
        if self.guided_json is not None:
            if self.guided_json is not True and not isinstance(self.guided_json, dict):
                raise ValueError(f"guided_json must be a JSON schema (a dict) or True (any "
                                 f"JSON object), got {self.guided_json!r}")
            if self.guided_regex is not None:
                raise ValueError("give guided_json or guided_regex, not both")
        if self.guided_regex is not None and (not isinstance(self.guided_regex, str)
                                              or not self.guided_regex):
            raise ValueError(f"guided_regex must be a non-empty string, got {self.guided_regex!r}")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens], got "
                             f"{self.min_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def num_choices(self) -> int:
        """Sequences the request runs: best_of, else n."""
        return self.best_of or self.n

    @property
    def adjusts_logits(self) -> bool:
        """Whether logits change before the pick (penalties, bias, min_tokens)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens)
