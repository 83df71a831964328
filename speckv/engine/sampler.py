"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds.

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


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Applies temperature, top-k and top-p per row.

    Args:
        logits: [B, V] float32.
        temperature: [B] (> 0), top_k: [B] (0 = off), top_p: [B] in (0, 1].

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
    drop[:, 0] = False  # the most likely token always stays: something is left to sample
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


class Sampler:
    """Picks one token per row; rows with a seed draw from their own generator."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int | SampleError]:
        """logits: [B, V] float32 -> B token ids (a SampleError for a row that failed)."""
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
                torch.tensor([p.top_p for p in sub], device=logits.device))
            probs = filtered.softmax(dim=-1).cpu()
            for j, i in enumerate(random_rows):
                tokens[i] = self._draw(probs[j], generators[i] or self.generator)
        for i in torch.nonzero(~torch.isfinite(top)).flatten().tolist():
            tokens[i] = SampleError("the model produced non-finite logits")  # not a token
        return tokens

    @staticmethod
    def _draw(probs: torch.Tensor, generator: torch.Generator) -> int | SampleError:
        try:
            return int(torch.multinomial(probs, 1, generator=generator))
        except RuntimeError as exc:  # NaN or inf probabilities
            logger.warning("sampling failed for one request: %s", exc)
            return SampleError(f"sampling failed: {exc}")
