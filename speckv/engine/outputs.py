"""What the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass

from speckv.engine.sequence import Sequence


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

    @classmethod
    def of(cls, seq: Sequence, text: str, delta: str) -> "RequestOutput":
        t = seq.times
        ttft = None if t.first_token is None else t.first_token - t.arrival
        n = len(seq.output_token_ids)
        tpot = None
        if n > 1 and t.first_token is not None and t.last_token is not None:
            tpot = (t.last_token - t.first_token) / (n - 1)
        return cls(
            request_id=seq.request_id, prompt=seq.prompt, text=text, delta=delta,
            token_ids=list(seq.output_token_ids), finished=seq.is_finished,
            finish_reason=None if seq.finish_reason is None else seq.finish_reason.value,
            num_prompt_tokens=seq.num_prompt_tokens, num_generated_tokens=n,
            time_to_first_token=ttft, per_token_latency=tpot, error=seq.error)
