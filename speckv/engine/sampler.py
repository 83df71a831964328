"""Token sampling for a batch: greedy, temperature, top-k, top-p, min-p, per-request
seeds, and the logit adjustments before the pick (OpenAI's and vLLM's definitions):

    repetition_penalty  a token in the prompt or output: logit / p if > 0, else logit * p
    frequency_penalty   logit -= f * (times the token was generated)
    presence_penalty    logit -= p * (1 if it was generated at all)
    logit_bias          logit += bias[token]
    min_tokens          EOS and stop_token_ids at -inf until that many were generated

applied in that order, to greedy and sampled rows alike; min_p (after temperature)
drops tokens less likely than min_p times the most likely one.

Sampling is per request in its failures too: a row that cannot be sampled (logits
that are NaN everywhere, say) yields a `SampleError` for that row, and the other
rows are sampled as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from speckv.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SampleError:
    """Why one row could not be sampled (in place of its token)."""

    message: str


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt: list[int],
                  output: list[int], stop_ids: frozenset[int]) -> torch.Tensor:
    """One row's logits [V] after its penalties, bias and min_tokens (a new tensor)."""
    vocab = logits.shape[-1]
    logits = logits.clone()
    device = logits.device
    generated = torch.tensor([t for t in output if t < vocab], dtype=torch.long, device=device)
    counts = torch.bincount(generated, minlength=vocab)[:vocab].to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor([t for t in prompt if t < vocab], dtype=torch.long, device=device)
        mask = counts > 0
        mask[seen] = True
        p = params.repetition_penalty
        logits = torch.where(mask, torch.where(logits > 0, logits / p, logits * p), logits)
    if params.frequency_penalty:
        logits -= params.frequency_penalty * counts
    if params.presence_penalty:
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    for token, bias in (params.logit_bias or {}).items():
        if token < vocab:
            logits[token] += bias
    if len(output) < params.min_tokens:  # nothing may end the request yet
        eos = () if params.ignore_eos else tuple(stop_ids)
        banned = [t for t in (*eos, *params.stop_token_ids) if t < vocab]
        logits[banned] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Applies temperature, top-k, top-p and min-p per row.

    Args:
        logits: [B, V] float32.
        temperature: [B] (> 0), top_k: [B] (0 = off), top_p: [B] in (0, 1], min_p: [B]
            in [0, 1] (0 = off; None: all off).

    Returns:
        [B, V] logits with filtered-out tokens at -inf.
    """
    logits = logits / temperature[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens ranked above it already reach top_p
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    if min_p is not None:  # less likely than min_p times the most likely token
        drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always stays: something is left to sample
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def ranked_logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]
                    ) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """Per row of `logits` [R, V]: the log probability of `tokens[r]` under the model
    (log-softmax of the raw logits), its rank (1 = most likely), and the `top[r]` most
    likely (token, log probability) pairs, most likely first."""
    logp = logits.float().log_softmax(dim=-1)
    index = torch.tensor(tokens, device=logp.device)[:, None]
    chosen = logp.gather(1, index)
    ranks = (logp > chosen).sum(dim=1) + 1
    k = max(top, default=0)
    best = logp.topk(k, dim=-1) if k else None
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    values = best.values.tolist() if k else [[]] * len(tokens)
    ids = best.indices.tolist() if k else [[]] * len(tokens)
    return [(chosen_l[r], ranks_l[r], list(zip(ids[r][:top[r]], values[r][:top[r]])))
            for r in range(len(tokens))]


class Sampler:
    """Picks one token per row; rows with a seed draw from their own generator."""

    def __init__(self, seed: int, stop_ids: frozenset[int] = frozenset()) -> None:
        """`stop_ids`: the model's EOS tokens (held back until a request's min_tokens)."""
        self.generator = torch.Generator().manual_seed(seed)
        self.stop_ids = stop_ids

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None],
                 histories: list[tuple[list[int], list[int]]] | None = None,
                 ) -> list[int | SampleError]:
        """logits: [B, V] float32 -> B token ids (a SampleError for a row that failed).
        `histories`: each row's (prompt, output) token ids, for the penalties."""
        adjusted = [i for i, p in enumerate(params) if p.adjusts_logits]
        if adjusted:
            if histories is None:
                raise ValueError("penalties, logit_bias and min_tokens need the histories")
            logits = logits.clone()
            for i in adjusted:
                logits[i] = adjust_logits(logits[i], params[i], *histories[i], self.stop_ids)
        top, argmax = logits.max(dim=-1)  # top is NaN where any logit of the row is
        tokens: list[int | SampleError] = argmax.tolist()
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            sub = [params[i] for i in random_rows]
            vocab = logits.shape[-1]
            filtered = filter_logits(
                logits[rows],
                torch.tensor([p.temperature for p in sub], device=logits.device),
                torch.tensor([min(p.top_k, vocab) for p in sub], device=logits.device),
                torch.tensor([p.top_p for p in sub], device=logits.device),
                torch.tensor([p.min_p for p in sub], device=logits.device))
            probs = filtered.softmax(dim=-1).cpu()
            for j, i in enumerate(random_rows):
                tokens[i] = self._draw(probs[j], generators[i] or self.generator)
        for i in torch.nonzero(~torch.isfinite(top)).flatten().tolist():  # not a token
            tokens[i] = SampleError(
                "no token is allowed: the response format, logit_bias and min_tokens exclude "
                "every one" if top[i] == float("-inf") else "the model produced non-finite logits")
        return tokens

    @staticmethod
    def _draw(probs: torch.Tensor, generator: torch.Generator) -> int | SampleError:
        try:
            return int(torch.multinomial(probs, 1, generator=generator))
        except RuntimeError as exc:  # NaN or inf probabilities
            logger.warning("sampling failed for one request: %s", exc)
            return SampleError(f"sampling failed: {exc}")
