"""Turns a scheduled step into model inputs, runs the forward pass and samples."""

from __future__ import annotations

from typing import Callable

import torch

from speckv.engine.outputs import Logprob, TokenLogprobs
from speckv.engine.sampler import SampleError, Sampler, ranked_logprobs
from speckv.engine.scheduler import SchedulerOutput
from speckv.engine.step import ScheduledChunk, StepAttention
from speckv.kv.attention import AttentionKernels
from speckv.kv.cache import KVCacheManager
from speckv.models.llama import LlamaModel
from speckv.prefetch.prefetcher import Prefetcher
from speckv.selection.step import Choice, PageSelection


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCacheManager, sampler: Sampler,
                 kernels: AttentionKernels, selection: PageSelection,
                 prefetcher: Prefetcher | None = None,
                 token_text: Callable[[int], str] = str, window: int = 0) -> None:
        """`token_text`: a token id's text, for logprobs; `window`: the model's sliding
        window where contexts outgrow it (0: none)."""
        self.model = model
        self.window = window
        self.token_text = token_text
        self.prefetcher = prefetcher
        self.kernels = kernels
        self.selection = selection
        self.cache = cache
        self.sampler = sampler
        self.device = model.device

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk], token_ids: list[list[int]],
                choices: list[Choice], logits_for: str | torch.Tensor = "last",
                select_prefill: bool = False) -> torch.Tensor:
        """Runs one step over `chunks` (decodes first); `token_ids[i]` are chunk i's tokens
        and `choices[i]` its page selection (applied to multi-token chunks only with
        `select_prefill`, for scoring).

        Returns logits [len(chunks), V] of each chunk's last token, [total tokens, V] of
        every token when `logits_for="all"`, or of the token rows `logits_for` lists.
        """
        flat = torch.tensor([t for ids in token_ids for t in ids], device=self.device)
        attention = StepAttention(self.cache, chunks, self.device, self.kernels,
                                  self.selection.plan(choices), select_prefill,
                                  query_for=self.model.project_query, prefetcher=self.prefetcher,
                                  window=self.window)
        reads_inputs = attention.prefetch is not None and self.prefetcher.reads_inputs
        hidden = self.model.forward(flat, attention.positions, attention,
                                    attention.layer_input if reads_inputs else None)
        attention.finish()
        self.cache.store_sealed([(c.request_id, c.start + c.num_tokens) for c in chunks])
        if isinstance(logits_for, torch.Tensor):
            hidden = hidden[logits_for.to(self.device)]
        elif logits_for == "last":
            ends = torch.cumsum(torch.tensor([c.num_tokens for c in chunks]), 0) - 1
            hidden = hidden[ends.to(self.device)]
        return self.model.compute_logits(hidden)

    def execute(self, sched: SchedulerOutput
                ) -> tuple[list[int | SampleError | None], list[TokenLogprobs | None]]:
        """Runs a scheduled step; returns the sampled token of each sequence (None for a
        sequence whose prompt is only partly prefilled) and, for those asking for
        logprobs, the token's `TokenLogprobs` (else None). Prompt logprobs are added to
        their sequences as their prompt is computed."""
        token_ids = [seq.all_token_ids[c.start:c.start + c.num_tokens]
                     for seq, c in zip(sched.seqs, sched.chunks)]
        ends = (torch.cumsum(torch.tensor([c.num_tokens for c in sched.chunks]), 0) - 1).tolist()
        prompt_rows = [(i, self._prompt_positions(seq, c)) for i, (seq, c)
                       in enumerate(zip(sched.seqs, sched.chunks))
                       if seq.prompt_logprobs is not None]
        prompt_rows = [(i, positions) for i, positions in prompt_rows if positions]
        hidden_rows = list(ends)  # each chunk's last token; then prompt logprobs' positions
        for i, positions in prompt_rows:
            first_row = ends[i] - sched.chunks[i].num_tokens + 1 - sched.chunks[i].start
            hidden_rows += [first_row + p for p in positions]
        logits = self.forward(sched.chunks, token_ids, [seq.choice for seq in sched.seqs],
                              logits_for=torch.tensor(hidden_rows))
        offset = len(ends)
        for i, positions in prompt_rows:
            seq = sched.seqs[i]
            seq.prompt_logprobs.extend(self._logprob_dicts(
                logits[offset:offset + len(positions)],
                [seq.prompt_token_ids[p + 1] for p in positions],
                seq.params.prompt_logprobs))
            offset += len(positions)
        logits = logits[:len(ends)]
        completes = [c.start + c.num_tokens == seq.num_tokens
                     for seq, c in zip(sched.seqs, sched.chunks)]
        rows = [i for i, done in enumerate(completes) if done]
        result: list[int | SampleError | None] = [None] * len(sched.seqs)
        logprobs: list[TokenLogprobs | None] = [None] * len(sched.seqs)
        if not rows:
            return result, logprobs
        seqs = [sched.seqs[i] for i in rows]
        picked = logits[rows]  # a copy: masks below leave the logprobs' logits alone
        for j, seq in enumerate(seqs):
            if seq.matcher is not None:  # only what its response format allows next
                picked[j].masked_fill_(~seq.matcher.allowed().to(picked.device), float("-inf"))
        sampled = self.sampler(picked, [s.params for s in seqs], [s.generator for s in seqs],
                               [(s.prompt_token_ids, s.output_token_ids) for s in seqs])
        for i, token in zip(rows, sampled):
            result[i] = token
        wanted = [j for j, (s, t) in enumerate(zip(seqs, sampled))
                  if s.logprobs is not None and isinstance(t, int)]
        if wanted:
            dicts = self._logprob_dicts(logits[[rows[j] for j in wanted]],
                                        [sampled[j] for j in wanted],
                                        [seqs[j].params.logprobs or 0 for j in wanted])
            for j, d in zip(wanted, dicts):
                logprobs[rows[j]] = d
        return result, logprobs

    @staticmethod
    def _prompt_positions(seq, chunk: ScheduledChunk) -> list[int]:
        """Positions p of this chunk whose logits give a prompt logprob not yet taken
        (of token p + 1; recomputation after a preemption takes none twice)."""
        have = len(seq.prompt_logprobs)  # entries for tokens 0 .. have - 1
        end = min(chunk.start + chunk.num_tokens, seq.num_prompt_tokens - 1)
        return list(range(max(chunk.start, have - 1), end))

    def _logprob_dicts(self, logits: torch.Tensor, tokens: list[int],
                       top: int | list[int]) -> list[TokenLogprobs]:
        tops = top if isinstance(top, list) else [top] * len(tokens)
        text = self.token_text
        out = []
        for token, (logprob, rank, best) in zip(tokens, ranked_logprobs(logits, tokens, tops)):
            entry = {t: Logprob(lp, r, text(t)) for r, (t, lp) in enumerate(best, start=1)}
            entry[token] = Logprob(logprob, rank, text(token))
            out.append(entry)
        return out
