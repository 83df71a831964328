"""What the engine returns for a request, shaped as vLLM's where the names mean the same:
`out.outputs[i].text`, `out.prompt_token_ids`, `out.outputs[i].finish_reason`,
`out.outputs[i].logprobs` (a dict per generated token: token id -> `Logprob`).

A request with `n > 1` runs as n sequences (the choices); its outputs hold one
`CompletionOutput` per choice, by index. The top-level `text`, `delta`, `token_ids`
and `finish_reason` are choice 0's (all a request with n = 1 has), `finished` is
whether every choice is, and `num_generated_tokens` counts the tokens of them all
(what usage reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from speckv.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class Logprob:
    """One token's log probability under the model (vLLM's `Logprob`): `rank` 1 is the
    most likely token; `decoded_token` its text (bytes not forming UTF-8 are U+FFFD)."""

    logprob: float
    rank: int
    decoded_token: str


TokenLogprobs = dict[int, Logprob]  # the chosen token and the most likely ones at one step


def most_likely(entry: TokenLogprobs, top: int) -> list[tuple[int, Logprob]]:
    """The `top` most likely (token id, Logprob) pairs of one step, most likely first."""
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank <= top),
                  key=lambda pair: pair[1].rank)


@dataclass(frozen=True, slots=True)
class CompletionOutput:
    """One completion (choice) of a request (vLLM's `CompletionOutput`). `logprobs`
    and `cumulative_logprob` are None unless the request asked for logprobs; `delta`
    is the text added since this choice's previous output (streaming)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    delta: str = ""


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
    outputs: list[CompletionOutput] = field(default_factory=list)  # one per choice
    num_cached_tokens: int = 0  # prompt tokens reused from the prefix cache (vLLM's name)
    # with SamplingParams.prompt_logprobs: per prompt token (None for the first)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @classmethod
    def of(cls, seq: Sequence, text: str, delta: str) -> "RequestOutput":
        return cls.of_choices([seq], [(text, delta)])

    @classmethod
    def of_choices(cls, seqs: list[Sequence], texts: list[tuple[str, str]],
                   request_id: str | None = None) -> "RequestOutput":
        """The output of a request whose choices are `seqs` (index order), `texts` each
        one's (visible text, delta); `request_id` the request's when n > 1."""
        first = seqs[0]
        t = first.times
        arrival = t.arrival
        firsts = [s.times.first_token for s in seqs if s.times.first_token is not None]
        ttft = min(firsts) - arrival if firsts else None
        n = len(first.output_token_ids)
        tpot = None
        if n > 1 and t.first_token is not None and t.last_token is not None:
            tpot = (t.last_token - t.first_token) / (n - 1)
        choices = [CompletionOutput(
            s.index, text, list(s.output_token_ids),
            s.cumulative_logprob if s.logprobs is not None else None,
            list(s.logprobs) if s.logprobs is not None and s.params.logprobs is not None
            else None,
            None if s.finish_reason is None else s.finish_reason.value, delta)
            for s, (text, delta) in zip(seqs, texts)]
        error = next((s.error for s in seqs if s.error is not None), None)
        return cls(
            request_id=request_id or first.request_id, prompt=first.prompt,
            text=choices[0].text, delta=choices[0].delta, token_ids=choices[0].token_ids,
            finished=all(s.is_finished for s in seqs),
            finish_reason="error" if error is not None else choices[0].finish_reason,
            num_prompt_tokens=first.num_prompt_tokens,
            num_generated_tokens=sum(len(s.output_token_ids) for s in seqs),
            time_to_first_token=ttft, per_token_latency=tpot, error=error,
            prompt_token_ids=list(first.prompt_token_ids), outputs=choices,
            num_cached_tokens=first.num_cached_tokens or 0,
            prompt_logprobs=None if first.prompt_logprobs is None else list(first.prompt_logprobs))
