"""Continuous batching: which sequences compute how many tokens in the next step.

Each step:
  1. running sequences, oldest first, get their next chunk (one token when
     decoding, up to the token budget while prefilling); a sequence that needs a
     new page when none is free preempts the youngest running sequence, whose
     pages are freed and which is recomputed later (vLLM's recompute preemption);
  2. waiting sequences join in arrival order while the batch, the token budget
     and the free pages allow; a request's later choices (n > 1) join once its first
     has computed the prompt, whose cached pages they then share. A request that does not fit waits; without a pool
     it is never partly admitted while others run. With a pool, admission is
     batch-aware: a sequence joins only when the pages it needs at its longest
     fit beside those of every running sequence at theirs (`KVCacheManager.admit`),
     so every admitted sequence decodes in every step and none is preempted.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from speckv.config import SchedulerConfig
from speckv.engine.sequence import Sequence, Status
from speckv.engine.step import ScheduledChunk
from speckv.kv.cache import KVCacheManager, RequestId

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SchedulerOutput:
    """What the next step computes: `chunks[i]` belongs to `seqs[i]`, decodes first."""

    seqs: list[Sequence] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.seqs.append(seq)
        self.chunks.append(ScheduledChunk(seq.request_id, seq.num_computed_tokens, num_tokens))

    def decode_first(self) -> None:
        order = sorted(range(len(self.chunks)), key=lambda i: self.chunks[i].num_tokens != 1)
        self.seqs = [self.seqs[i] for i in order]
        self.chunks = [self.chunks[i] for i in order]


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: KVCacheManager) -> None:
        self.config = config
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request_id: RequestId) -> Sequence | None:
        """Takes a request out of the queues and frees its pages (finish or abort)."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                break
        else:
            seq = next((s for s in self.waiting if s.request_id == request_id), None)
            if seq is None:
                return None
            self.waiting.remove(seq)
        self.cache.free(request_id)
        return seq

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:  # memory is short: admitting now would only thrash
            self._schedule_waiting(out, budget)
        out.decode_first()
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = self._chunk(seq, budget)
            while not self.cache.allocate(seq.request_id, seq.num_computed_tokens + num_tokens):
                # the youngest: never one scheduled earlier in this loop (those are older)
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != Status.RUNNING:  # preempted itself: nothing left to run
                break
            out.add(seq, num_tokens)
            budget -= num_tokens
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.after is not None and not seq.after.prompt_done:
                break  # a later choice of a request waits to reuse the first one's prompt
            reused = seq.num_computed_tokens == 0 and self._reuse_prefix(seq)
            num_tokens = self._chunk(seq, budget)
            end = seq.num_computed_tokens + num_tokens
            if (num_tokens == 0 or not self.cache.admit(seq.request_id, seq.max_num_tokens)
                    or not self.cache.allocate(seq.request_id, end)):
                if reused:  # a waiting sequence holds no pages: they stay cached, idle
                    self.cache.free(seq.request_id)
                    seq.num_computed_tokens = 0
                break  # wait for pages; later requests wait behind it (FIFO)
            self.waiting.popleft()
            self._record_reuse(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.add(seq, num_tokens)
            budget -= num_tokens

    def _reuse_prefix(self, seq: Sequence) -> bool:
        """Starts `seq` after the longest prefix of its tokens whose pages are cached (the
        last token is always computed: its logits pick the next one); True if it did."""
        prefix = self.cache.prefix
        if prefix is None or not seq.params.cache_prompt or seq.prompt_logprobs is not None:
            return False  # (prompt logprobs need every prompt position computed)
        reusable = self._reusable_pages(seq)
        keys = prefix.keys_of(seq.page_keys, seq.all_token_ids[:reusable * prefix.page_size])
        seq.num_computed_tokens = self.cache.reuse_prefix(seq.request_id, keys[:reusable])
        return seq.num_computed_tokens > 0

    def _reusable_pages(self, seq: Sequence) -> int:
        """Full pages of `seq` that a hit may cover: all but the one with its last token."""
        return (seq.num_tokens - 1) // self.cache.page_size

    def _record_reuse(self, seq: Sequence) -> None:
        prefix = self.cache.prefix
        if prefix is not None and seq.params.cache_prompt:
            reusable = self._reusable_pages(seq) * prefix.page_size
            prefix.counters.record(reusable, seq.num_computed_tokens)
            if seq.num_cached_tokens is None:  # as first scheduled (vLLM's)
                seq.num_cached_tokens = seq.num_computed_tokens

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens to compute for `seq` now: its remaining prompt (or one token) within the
        token budget. A running sequence's chunk shrinks to the whole pages that fit
        (at least one page: the caller preempts younger sequences for it). Without a
        pool, a waiting one is admitted with its whole chunk or waits (0), unless
        nothing else runs. With a pool its chunk shrinks too: a prefill chunk's pages
        stay in DEVICE until stored at the end of the step, so admitting prompts in
        page-sized pieces is what lets many sequences share a small DEVICE tier."""
        want = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if seq.status == Status.WAITING and self.running and self.cache.store is None:
            fits = self.cache.can_allocate(seq.request_id, seq.num_computed_tokens + want)
            return want if fits else 0
        fit = self.cache.fitting_tokens(seq.request_id, seq.num_computed_tokens, want)
        if fit == 0 and seq.status == Status.RUNNING:
            return min(want, self.cache.page_size)
        return fit

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        logger.info("preempting %s: no free page (it will be recomputed)", seq.request_id)
        self.num_preemptions += 1
        self.running.remove(seq)
        self.cache.free(seq.request_id)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
