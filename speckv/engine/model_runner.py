"""Turns a scheduled step into model inputs, runs the forward pass and samples."""

from __future__ import annotations

import torch

from speckv.engine.sampler import SampleError, Sampler
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
                 prefetcher: Prefetcher | None = None) -> None:
        self.model = model
        self.prefetcher = prefetcher
        self.kernels = kernels
        self.selection = selection
        self.cache = cache
        self.sampler = sampler
        self.device = model.device

    @torch.inference_mode()
    def forward(self, chunks: list[ScheduledChunk], token_ids: list[list[int]],
                choices: list[Choice], logits_for: str = "last",
                select_prefill: bool = False) -> torch.Tensor:
        """Runs one step over `chunks` (decodes first); `token_ids[i]` are chunk i's tokens
        and `choices[i]` its page selection (applied to multi-token chunks only with
        `select_prefill`, for scoring).

        Returns logits [len(chunks), V] of each chunk's last token, or
        [total tokens, V] of every token when `logits_for="all"`.
        """
        flat = torch.tensor([t for ids in token_ids for t in ids], device=self.device)
        attention = StepAttention(self.cache, chunks, self.device, self.kernels,
                                  self.selection.plan(choices), select_prefill,
                                  query_for=self.model.project_query, prefetcher=self.prefetcher)
        reads_inputs = attention.prefetch is not None and self.prefetcher.reads_inputs
        hidden = self.model.forward(flat, attention.positions, attention,
                                    attention.layer_input if reads_inputs else None)
        attention.finish()
        self.cache.store_sealed([(c.request_id, c.start + c.num_tokens) for c in chunks])
        if logits_for == "last":
            ends = torch.cumsum(torch.tensor([c.num_tokens for c in chunks]), 0) - 1
            hidden = hidden[ends.to(self.device)]
        return self.model.compute_logits(hidden)

    def execute(self, sched: SchedulerOutput) -> list[int | SampleError | None]:
        """Runs a scheduled step; returns the sampled token of each sequence, or None
        for a sequence whose prompt is only partly prefilled."""
        token_ids = [seq.all_token_ids[c.start:c.start + c.num_tokens]
                     for seq, c in zip(sched.seqs, sched.chunks)]
        logits = self.forward(sched.chunks, token_ids, [seq.choice for seq in sched.seqs])
        completes = [c.start + c.num_tokens == seq.num_tokens
                     for seq, c in zip(sched.seqs, sched.chunks)]
        rows = [i for i, done in enumerate(completes) if done]
        if not rows:
            return [None] * len(sched.seqs)
        seqs = [sched.seqs[i] for i in rows]
        sampled = self.sampler(logits[rows], [s.params for s in seqs], [s.generator for s in seqs],
                               [(s.prompt_token_ids, s.output_token_ids) for s in seqs])
        result: list[int | SampleError | None] = [None] * len(sched.seqs)
        for i, token in zip(rows, sampled):
            result[i] = token
        return result
