"""What the engine returns for a request, shaped as vLLM's where the names mean the same:
`out.outputs[0].text`, `out.prompt_token_ids`, `out.outputs[0].finish_reason`."""

from __future__ import annotations

from dataclasses import dataclass, field

from speckv.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """One completion of a request (vLLM's `CompletionOutput`; speckv makes one per
    request: `n > 1` is not implemented, nor are logprobs, so those fields are None)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: None
    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A request's result so far (streaming) or in full (`finished`).

    Times are in seconds: `time_to_first_token` from arrival to the first
    generated token, `per_token_latency` the mean time between later tokens.
    """

    request_id: str
    prompt: str
    text: str
    delta: str  # text added since the previous output of this request
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_generated_tokens: int
    time_to_first_token: float | None
    per_token_latency: float | None
    error: str | None = None  # with finish_reason "error": what failed this request alone
    prompt_token_ids: list[int] = field(default_factory=list)
    outputs: list[CompletionOutput] = field(default_factory=list)  # vLLM's shape: one here
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (vLLM's name)

    @classmethod
    def of(cls, seq: Sequence, text: str, delta: str) -> "RequestOutput":
        t = seq.times
        ttft = None if t.first_token is None else t.first_token - t.arrival
        n = len(seq.output_token_ids)
        tpot = None
        if n > 1 and t.first_token is not None and t.last_token is not None:
            tpot = (t.last_token - t.first_token) / (n - 1)
        tokens = list(seq.output_token_ids)
        reason = None if seq.finish_reason is None else seq.finish_reason.value
        return cls(
            request_id=seq.request_id, prompt=seq.prompt, text=text, delta=delta,
            token_ids=tokens, finished=seq.is_finished, finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_generated_tokens=n,
            time_to_first_token=ttft, per_token_latency=tpot, error=seq.error,
            prompt_token_ids=list(seq.prompt_token_ids),
            outputs=[CompletionOutput(0, text, tokens, None, None, reason)],
            num_cached_tokens=seq.num_cached_tokens or 0)
