"""A request as the engine tracks it: tokens, progress, status and timings."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from speckv.engine.sampling_params import SEED_RANGE, SamplingParams
from speckv.kv.cache import RequestId
from speckv.kv.prefix import PageKey
from speckv.models.tokenizer import IncrementalDetokenizer


class Status(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context window
    ABORT = "abort"
    ERROR = "error"  # the engine failed this request alone (`RequestOutput.error` says why)


@dataclass(slots=True)
class RequestTimes:
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    """One request in the engine: its prompt, generated tokens and progress."""

    def __init__(self, request_id: RequestId, prompt: str, prompt_token_ids: list[int],
                 params: SamplingParams, detokenizer: IncrementalDetokenizer,
                 index: int = 0) -> None:
        self.request_id = request_id
        self.index = index  # its choice's index in a request of n > 1 (else 0)
        self.group: RequestId | None = None  # that request's id (n > 1)
        # admitted only once this one has computed its prompt (a choice after the first:
        # its prompt's pages are then cached, and reused)
        self.after: Sequence | None = None
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params
        self.detokenizer = detokenizer
        self.status = Status.WAITING
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None  # why the engine failed it (FinishReason.ERROR)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens: int | None = None  # prompt tokens reused when first scheduled
        self.page_keys: list[PageKey] = []  # prefix-cache keys of its full pages, as computed
        # the most tokens it may hold (prompt + max_tokens, within the context window)
        self.max_num_tokens = len(prompt_token_ids) + params.max_tokens
        self.text = ""  # generated text, stop string removed
        self.emitted = 0  # characters of `text` already given out in outputs
        self.times = RequestTimes()
        self.generator: torch.Generator | None = None
        # with params.logprobs: per generated token, it and the most likely ones
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0  # of its generated tokens (kept with logprobs)
        # with params.prompt_logprobs: per prompt token (None for the first), as computed
        self.prompt_logprobs: list | None = None if params.prompt_logprobs is None else [None]
        self.choice = None  # its page selection (`speckv.selection.step.Choice`), set by the engine
        self.matcher = None  # its structured-output grammar (`speckv.engine.guided.Matcher`)
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed % SEED_RANGE)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def prompt_done(self) -> bool:
        """Whether its prompt's K/V are computed (or it finished)."""
        return self.is_finished or self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def finish(self, reason: FinishReason) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.times.finished = time.perf_counter()
