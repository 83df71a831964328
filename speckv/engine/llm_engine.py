"""The engine: requests in, one scheduled step at a time, outputs back.

    add_request ─► Scheduler.schedule ─► ModelRunner.execute ─► _append_token ─► RequestOutput
                       (pages via KVCacheManager)          (stop / length / EOS checks)
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from types import ModuleType
from typing import Iterable

import torch

from speckv.config import EngineConfig, PrefetchConfig, format_size
from speckv.plugins import check_names
from speckv.engine.guided import Grammars
from speckv.engine.trace import StepTrace
from speckv.engine.model_runner import ModelRunner
from speckv.engine.outputs import RequestOutput
from speckv.engine.sampler import SampleError, Sampler
from speckv.engine.sampling_params import SamplingParams
from speckv.engine.scheduler import Scheduler
from speckv.engine.threads import ThreadPolicy
from speckv.util import is_int
from speckv.engine.sequence import FinishReason, Sequence
from speckv.engine.step import ScheduledChunk
from speckv.kv.attention import (AttentionKernels, cpu_kernel_decode_attention,
                                 cpu_kernel_fused_attention, cpu_kernel_sparse_decode_attention)
from speckv.kv.cpu_kernels import load_cpu_kernels
from speckv.kv.cache import KVCacheManager, RequestId
from speckv.kv.eviction import make_eviction
from speckv.kv.page_pool import DevicePagePool
from speckv.kv.prefix import PrefixCache, namespace_key
from speckv.kv.summaries import SummaryStore
from speckv.kv.tiers import TieredStore, TierOptions, kernel_row_format
from speckv.codecs.base import PageShape, make_codec
from speckv.pool.base import POOLS, PoolUnavailable
from speckv.models.loaded import LoadedModel, load_model, resolve_device
from speckv.models.tokenizer import IncrementalDetokenizer
from speckv.prefetch.prefetcher import Prefetcher
from speckv.selection.step import Choice, PageSelection

logger = logging.getLogger(__name__)

class LLMEngine:
    """Owns the model, the paged KV cache and the scheduler; advanced by `step()`."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """Builds the engine; `loaded` reuses weights already loaded with `config.model`.

        Raises:
            ValueError: a bad option, or a plugin name that is not registered.
        """
        self.config = check_names(config)
        self.threads = ThreadPolicy(config.model.threads)
        attention, self._kernels = self._attention_kernels(config)  # fails fast
        if loaded is None:
            loaded = load_model(config.model)
        elif not loaded.serves(config.model):
            raise ValueError(f"the loaded model was built for {loaded.config}, not {config.model}")
        self.loaded = loaded
        self.model, self.tokenizer, self.args = loaded.model, loaded.tokenizer, loaded.args
        self._stop_ids = self.args.stop_ids  # EOS tokens (Llama 3 lists several)
        self.device, self.dtype = loaded.model.device, loaded.model.dtype
        self.max_model_len = loaded.context_window(config.model)
        window = self.args.sliding_window  # attention past it leaves pages out
        self.window = window if window and window < self.max_model_len else 0
        self.cache = self._build_cache(config)
        self.prefetcher = self._build_prefetcher(config)
        num_pages = self.cache.pool.num_pages
        self.selection = self._build_selection(config)
        self.scheduler = Scheduler(config.scheduler, self.cache)
        sampler = Sampler(config.sampler.engine_seed, self._stop_ids)
        self.runner = ModelRunner(self.model, self.cache, sampler, attention, self.selection,
                                  self.prefetcher, token_text=self.tokenizer.token_text,
                                  window=self.window)
        self._grammars = Grammars(self.tokenizer, self.args.vocab_size, self._stop_ids)
        self._sequences: dict[RequestId, Sequence] = {}
        # requests of n > 1 (or best_of): request id -> (its params, its choices by index)
        self._groups: dict[RequestId, tuple[SamplingParams, list[Sequence]]] = {}
        self._ids = itertools.count()
        self._trace = None if config.prefetch.trace is None else \
            StepTrace(config.prefetch.trace, self._trace_meta())
        logger.info("engine ready: %s on %s (%s), %d KV pages of %d bytes",
                    self.args.name, self.device, config.model.dtype, num_pages, self.page_bytes)

    def _build_cache(self, config: EngineConfig) -> KVCacheManager:
        cc, pc, args = config.cache, config.pool, self.args
        element_size = torch.empty((), dtype=self.dtype).element_size()
        self.page_bytes = DevicePagePool.page_bytes(
            cc.page_size, args.num_kv_heads, args.head_dim, element_size)
        num_pages = cc.device_kv_bytes // self.page_bytes
        pinned = 1 + -(-pc.residual_tokens // cc.page_size) + int(pc.keep_sink_page)
        minimum = args.num_layers * (pinned if pc.pool != "none" else 1)
        if num_pages < minimum:
            raise ValueError(
                f"device_kv_bytes={cc.device_kv_bytes} holds {num_pages} pages, but one step "
                f"of one sequence needs {pinned} page(s) in each of {args.num_layers} layers: "
                f"the minimum is {minimum * self.page_bytes} bytes "
                f"({format_size(minimum * self.page_bytes)})")
        store = eviction = backend = None
        if pc.pool != "none":
            codec = make_codec(pc.codec, PageShape(cc.page_size, args.num_kv_heads,
                                                   args.head_dim, self.dtype))
            backend = POOLS.get(pc.pool)(codec.slot_bytes, pc.pool_bytes, device=self.device,
                                          numa_node=pc.pool_numa_node,
                                          socket=pc.memnode_socket, link=pc.link,
                                          timeout=pc.memnode_timeout, url=pc.pool_url,
                                          valkey_timeout=pc.valkey_timeout)
            try:
                in_place = self._reads_in_place(config, codec, backend)
                # the PREFETCH tier's pages share DEVICE's tensor (a promotion hands a page
                # over without a copy): there when pooled pages are copied back to be read
                spare = 0 if in_place else config.prefetch.prefetch_bytes // self.page_bytes
                pool = DevicePagePool(num_pages, cc.page_size, args.num_kv_heads,
                                      args.head_dim, dtype=self.dtype, device=self.device,
                                      spare=spare)
                eviction = make_eviction(pc.eviction, pool.num_slots)
                store = TieredStore(pool, backend, codec,
                                    TierOptions(pc.residual_tokens, pc.keep_sink_page),
                                    kernels=self._kernels, in_place=in_place)
            except ValueError:
                backend.close()  # e.g. the memory node this engine spawned
                raise
        else:
            pool = DevicePagePool(num_pages, cc.page_size, args.num_kv_heads, args.head_dim,
                                  dtype=self.dtype, device=self.device)
        live_pages = num_pages + (0 if store is None else store.backend.num_slots)
        slices = config.selection.summary_slices
        summaries = SummaryStore(live_pages, args.num_kv_heads, args.head_dim,
                                 dtype=self.dtype, device=self.device, slices=slices)
        prefix = None
        if cc.enable_prefix_caching:
            # everything that makes a page's bytes differ (and what is shared of it)
            prefix = PrefixCache(cc.page_size, namespace_key(
                self.loaded.fingerprint(), cc.page_size, args.num_layers, args.num_kv_heads,
                args.head_dim, pc.codec if store is not None else "none", pc.keep_sink_page,
                f"slices={slices}"))  # a page's stored summary row differs with them
        return KVCacheManager(pool, args.num_layers, self.max_model_len, store, summaries,
                              eviction, prefix)

    def _trace_meta(self) -> dict:
        """What a projection of this engine's trace needs to know (`speckv.sim`)."""
        from speckv.sim.shapes import of_args

        store, cfg = self.cache.store, self.config
        raw_page = self.page_bytes  # K and V of one page of one layer, in DEVICE
        return {"shape": of_args(self.args).as_dict(), "weight_bytes": self.model.weight_bytes,
                "kv_element_bytes": self.model.element_size, "dtype": cfg.model.dtype,
                "page_size": cfg.cache.page_size, "pool": cfg.pool.pool,
                "codec": None if store is None else store.codec.name,
                "codec_ratio": 1.0 if store is None else store.codec.slot_bytes / raw_page,
                "kv_read": None if store is None else
                ("in_place" if self.cache.reads_in_place else "copy"),
                "link": cfg.pool.link, "selector": cfg.selection.selector,
                "token_budget": cfg.selection.token_budget, "predictor": cfg.prefetch.predictor,
                "summary_bytes_per_page": self.cache.summaries.slot_bytes * self.args.num_layers,
                "threads": torch.get_num_threads()}

    def _reads_in_place(self, config: EngineConfig, codec, backend) -> bool:
        """Whether attention reads pool rows in place: `in_place`, or `auto` where the
        CPU kernels can read this codec's rows from this pool (TieredStore checks what
        `in_place` needs). Predictors work either way: in place, their hints are
        software prefetches of the rows (`speckv.prefetch.warm`)."""
        kv_read = config.cache.kv_read
        if kv_read != "auto":
            return kv_read == "in_place"
        return kernel_row_format(self._kernels, codec, backend, self.device) is not None

    def _build_prefetcher(self, config: EngineConfig) -> Prefetcher | None:
        """The prefetcher, with a pool (it moves pages out of it); else None.

        Raises:
            ValueError: predictors without a pool, an unknown predictor, a bad depth.
        """
        pc = config.prefetch
        if self.cache.store is None:
            if pc.predictors:
                raise ValueError(f"predictor={pc.predictor!r} prefetches pages from a pool, but "
                                 "pool='none': choose pool='local' or pool='memnode'")
            return None
        prefetcher = Prefetcher(self.cache.store, pc, self.args.num_layers)
        self.cache.on_keys_freed(prefetcher.forget)
        return prefetcher

    def set_prefetch(self, predictor: str) -> None:
        """Switches the prefetch predictors (e.g. "layer_ahead,step_ahead", or "none") from
        the next step on, e.g. to compare predictors on the same running sequences.

        Raises:
            ValueError: no pool, or an unknown predictor.
        """
        names = PrefetchConfig(predictor=predictor).predictors
        if self.prefetcher is None:
            if names:
                raise ValueError("prefetching needs a pool: build the engine with pool='local' "
                                 "or pool='memnode'")
            return
        self.prefetcher.set_predictors(names)

    def _build_selection(self, config: EngineConfig) -> PageSelection:
        sc = config.selection
        if isinstance(sc.token_budget, int) and sc.token_budget > self.max_model_len:
            raise ValueError(f"token_budget={sc.token_budget} is above the context window of "
                             f"{self.max_model_len} tokens")
        return PageSelection(sc, self.args.num_layers, config.cache.page_size,
                             self.args.num_kv_heads, self.page_bytes, self.window)

    def close(self) -> None:
        """Releases the pool (stopping a memory node this engine spawned)."""
        for rid in self._request_ids():
            self.abort(rid)
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        if self.cache.store is not None:
            self.cache.store.backend.close()

    @staticmethod
    def _attention_kernels(config: EngineConfig) -> tuple[AttentionKernels, ModuleType | None]:
        """The attention functions, and the compiled CPU kernels when the backend uses them
        (the tiers then also fetch pages with them)."""
        backend, device = config.cache.attention_backend, resolve_device(config.model.device)
        kernel_fits = device.type == "cpu" and config.model.dtype == "float32"
        if backend == "cpu_kernel" and not kernel_fits:
            raise ValueError(
                f"attention_backend='cpu_kernel' needs device cpu and dtype float32, not "
                f"{device.type} and {config.model.dtype}: use 'torch' or 'auto'")
        if backend == "torch" or (backend == "auto" and not kernel_fits):
            return AttentionKernels(), None
        kernels = load_cpu_kernels()
        return AttentionKernels(cpu_kernel_decode_attention(kernels),
                                cpu_kernel_sparse_decode_attention(kernels),
                                kernels.gather_pages, cpu_kernel_fused_attention(kernels)), kernels

    # ------------------------------------------------------------ requests

    def add_request(self, prompt: str | list[int], params: SamplingParams,
                    request_id: str | None = None) -> RequestId:
        """Queues a request (text, or token ids) and returns its id.

        Raises:
            ValueError: empty prompt, a prompt that leaves no room in the context
                window, a request larger than the whole KV pool, a duplicate id.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            token_ids = self._checked_token_ids(prompt)
            text = self.tokenizer.decode(token_ids, skip_special_tokens=False)
        if not token_ids:
            raise ValueError("prompt is empty (it encodes to no tokens)")
        vocab = self.args.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}),
                          ("stop_token_ids", params.stop_token_ids)):
            if any(t >= vocab for t in ids):
                raise ValueError(f"{name} names token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens; the context window is "
                f"{self.max_model_len} tokens and needs room for at least one generated token")
        rid = RequestId(request_id if request_id is not None else f"req-{next(self._ids)}")
        if rid in self._sequences or rid in self._groups:
            raise ValueError(f"request id {rid!r} is already in use")
        most_tokens = min(len(token_ids) + params.max_tokens, self.max_model_len)
        choice = self.selection.choice(params.selector, params.token_budget, most_tokens)
        self._ensure_pool()
        self._check_fits(most_tokens)
        if params.num_choices == 1:
            seqs = [Sequence(rid, text, token_ids, params, IncrementalDetokenizer(self.tokenizer))]
        else:
            seqs = [Sequence(RequestId(f"{rid}#{i}"), text, token_ids, self._choice_params(params, i),
                             IncrementalDetokenizer(self.tokenizer), index=i)
                    for i in range(params.num_choices)]
            for seq in seqs:
                seq.group = rid
                if seq.index and self.cache.prefix is not None and params.cache_prompt:
                    seq.after = seqs[0]  # admitted once it can reuse the first's prompt pages
            self._groups[rid] = (params, seqs)
        for seq in seqs:  # (a bad grammar raises here, before anything is queued)
            seq.matcher = self._grammars.matcher(params.guided_json, params.guided_regex)
        for seq in seqs:
            seq.choice = choice
            seq.max_num_tokens = most_tokens
            self._sequences[seq.request_id] = seq
            self.scheduler.add(seq)
        return rid

    @staticmethod
    def _choice_params(params: SamplingParams, i: int) -> SamplingParams:
        """Choice i of a request of n > 1: its own seed (seed + i), its prompt logprobs
        taken once (by choice 0), logprobs kept where best_of ranks choices by them."""
        logprobs = params.logprobs
        if logprobs is None and params.num_choices > params.n:
            logprobs = 0
        return dataclasses.replace(
            params, n=1, best_of=None, logprobs=logprobs,
            seed=None if params.seed is None else params.seed + i,
            prompt_logprobs=params.prompt_logprobs if i == 0 else None)

    def _checked_token_ids(self, prompt: object) -> list[int]:
        """A prompt of token ids, each an int in [0, vocab_size), checked before anything
        (the detokenizer included) reads it."""
        vocab = self.args.vocab_size
        try:
            token_ids = list(prompt)
        except TypeError:
            raise ValueError(f"prompt must be text or a list of token ids, not "
                             f"{type(prompt).__name__}") from None
        for i, t in enumerate(token_ids):
            if not is_int(t) or not 0 <= t < vocab:
                raise ValueError(f"prompt[{i}] = {t!r}: prompt token ids must be integers in "
                                 f"[0, {vocab})")
        return token_ids

    def _check_fits(self, num_tokens: int) -> None:
        cache = self.cache
        most_pages = cache.worst_requirement(num_tokens)
        if most_pages > cache.pool.num_pages:
            raise ValueError(
                f"request needs up to {num_tokens} tokens of KV ({most_pages} DEVICE pages at "
                f"once) but the DEVICE tier holds {cache.pool.num_pages} pages: raise "
                "device_kv_bytes (or use a pool), or lower max_tokens")
        if cache.store is not None:
            pool_pages = cache.worst_pool_pages(num_tokens)  # what admission reserves
            if pool_pages > cache.store.backend.num_slots:
                raise ValueError(
                    f"request needs up to {pool_pages} pool pages but the pool holds "
                    f"{cache.store.backend.num_slots}: raise pool_bytes or lower max_tokens")

    def _ensure_pool(self) -> None:
        """Reconnects a pool that was lost (raises PoolUnavailable if it cannot)."""
        if self.cache.store is not None and not self.cache.store.backend.is_available:
            self.cache.store.backend.revive()

    def check_pool(self) -> bool:
        """Asks the pool for a sign of life within its deadline (an idle server calls
        this now and then, so a dead or stopped memory node shows before a request
        fails on it); reconnects a lost one. Returns whether the pool can serve."""
        store = self.cache.store
        if store is None:
            return True
        try:
            if store.backend.is_available:
                store.backend.ping()
            else:
                store.backend.revive()
        except PoolUnavailable:
            self._fail_all("the KV pool became unavailable")
            return False
        return True

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its pages; returns its final output, or None if unknown."""
        rid = RequestId(request_id)
        _, seqs = self._groups.get(rid, (None, [self._sequences.get(rid)]))
        if seqs[0] is None:
            return None
        for seq in seqs:
            self._stop(seq)
        return self._group_output(rid, seqs, seqs) if rid in self._groups else self._output(seqs[0])

    def _stop(self, seq: Sequence) -> None:
        """Aborts one unfinished sequence, freeing its pages (a finished one is left as is)."""
        if self._sequences.pop(seq.request_id, None) is not None:
            self.scheduler.remove(seq.request_id)
            seq.finish(FinishReason.ABORT)

    def set_selection(self, request_id: str, selector: str | None = None,
                      token_budget: int | float | str | None = None) -> None:
        """Changes a running request's page selection from its next step on (None: the
        engine's default), e.g. to compare selectors on the same prefilled sequences."""
        seq = self._sequences.get(RequestId(request_id))
        if seq is None:
            raise ValueError(f"unknown request id {request_id!r}")
        seq.choice = self.selection.choice(selector, token_budget)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_unfinished(self) -> int:
        return len(self._request_ids())

    def _request_ids(self) -> list[RequestId]:
        """Every unfinished request's id (a request of n > 1 once)."""
        return list(self._groups) + [rid for rid, s in self._sequences.items() if s.group is None]

    # ------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns an output for every request that advanced."""
        self.threads.observe()
        try:
            self._ensure_pool()
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return []
            started = time.perf_counter()
            tokens, logprobs = self.runner.execute(sched)
            if self._trace is not None:
                self._trace.write(sched, time.perf_counter() - started, self.stats())
        except PoolUnavailable:
            self._fail_all("the KV pool became unavailable")
            raise
        now = time.perf_counter()
        outputs = []
        groups: dict[RequestId, list[Sequence]] = {}  # requests of n > 1 that advanced
        for seq, chunk, token, logprob in zip(sched.seqs, sched.chunks, tokens, logprobs):
            seq.num_computed_tokens += chunk.num_tokens
            self._cache_pages(seq)
            if token is None:
                continue
            try:
                self._advance(seq, token, logprob, now)
            except Exception as exc:  # noqa: BLE001 — this request fails, the others go on
                logger.exception("request %s failed", seq.request_id)
                self._fail(seq, f"{type(exc).__name__}: {exc}")
            if seq.is_finished:
                self.scheduler.remove(seq.request_id)
                self._sequences.pop(seq.request_id, None)
            if seq.group is None:
                outputs.append(self._output(seq))
            elif seq.group in self._groups:
                groups.setdefault(seq.group, []).append(seq)
        for rid, advanced in groups.items():
            if any(s.error is not None for s in advanced):  # one choice failed: the request
                for s in self._groups[rid][1]:               # fails, its other choices stop
                    self._stop(s)
            out = self._group_output(rid, self._groups[rid][1], advanced)
            if out is not None:
                outputs.append(out)
        return outputs

    def _group_output(self, rid: RequestId, seqs: list[Sequence], advanced: list[Sequence]
                      ) -> RequestOutput | None:
        """The output of a request of n > 1 after a step that advanced `advanced` of its
        choices (None while best_of > n is unfinished: its choices are ranked at the end)."""
        params = self._groups[rid][0]
        n = params.n
        done = all(s.is_finished for s in seqs)
        if done:
            del self._groups[rid]
        if len(seqs) > n and not done:
            return None
        texts = [self._visible(s) if s in advanced else
                 (s.text if s.is_finished else s.text[:s.emitted], "") for s in seqs]
        out = RequestOutput.of_choices(seqs, texts, request_id=rid)
        if len(seqs) > n:  # best_of: the n choices most likely under the model
            best = sorted(out.outputs, key=lambda c: -(c.cumulative_logprob or 0.0))[:n]
            choices = [dataclasses.replace(c, index=i, logprobs=c.logprobs if params.logprobs
                                           is not None else None) for i, c in enumerate(best)]
            out = dataclasses.replace(out, outputs=choices, text=choices[0].text,
                                      delta=choices[0].delta, token_ids=choices[0].token_ids,
                                      finish_reason=out.finish_reason if out.error
                                      else choices[0].finish_reason)
        return out

    def _cache_pages(self, seq: Sequence) -> None:
        """Offers the prefix cache the pages `seq` has sealed so far."""
        prefix = self.cache.prefix
        if prefix is None or not seq.params.cache_prompt:
            return
        n = seq.num_computed_tokens
        if n // prefix.page_size > len(seq.page_keys):
            prefix.keys_of(seq.page_keys, seq.all_token_ids[:n])
        self.cache.cache_pages(seq.request_id, seq.page_keys, n)

    def _advance(self, seq: Sequence, token: int | SampleError, logprob, now: float) -> None:
        if isinstance(token, SampleError):
            self._fail(seq, token.message)
            return
        if seq.logprobs is not None and logprob is not None:
            seq.logprobs.append(logprob)
            seq.cumulative_logprob += logprob[token].logprob
        if seq.matcher is not None:
            seq.matcher.consume(token)
        self._append_token(seq, token, now)

    @staticmethod
    def _fail(seq: Sequence, why: str) -> None:
        seq.error = why
        seq.finish(FinishReason.ERROR)

    def _fail_all(self, why: str) -> None:
        """Aborts every request (their pooled pages are gone), and forgets the cached pages
        that were in the pool; the engine stays usable."""
        logger.error("%s: aborting %d request(s)", why, len(self._sequences))
        for rid in self._request_ids():
            self.abort(rid)
        self.cache.forget_pool_pages()

    def _append_token(self, seq: Sequence, token: int, now: float) -> None:
        seq.output_token_ids.append(token)
        if seq.times.first_token is None:
            seq.times.first_token = now
        seq.times.last_token = now
        params = seq.params
        if (token in self._stop_ids and not params.ignore_eos) or token in params.stop_token_ids:
            seq.finish(FinishReason.STOP)
            return
        searched = len(seq.text)  # a stop string can only end in the new text
        seq.detokenizer.add(token)
        seq.text = seq.detokenizer.text
        if params.stop and self._truncate_at_stop(seq, searched):
            seq.finish(FinishReason.STOP)
        elif len(seq.output_token_ids) >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish(FinishReason.LENGTH)

    @staticmethod
    def _truncate_at_stop(seq: Sequence, searched: int) -> bool:
        """Cuts the text at the first stop string ending after `searched` characters."""
        stops = seq.params.stop
        cuts = [i for i in (seq.text.find(s, max(0, searched - len(s) + 1)) for s in stops)
                if i >= 0]
        if not cuts:
            return False
        seq.text = seq.text[:min(cuts)]
        return True

    @classmethod
    def _output(cls, seq: Sequence) -> RequestOutput:
        return RequestOutput.of(seq, *cls._visible(seq))

    @staticmethod
    def _visible(seq: Sequence) -> tuple[str, str]:
        """(text, delta) to give out; text that could still become a stop string is held back."""
        visible = len(seq.text)
        if not seq.is_finished and seq.params.stop:
            visible -= max(len(s) for s in seq.params.stop) - 1
        visible = max(visible, seq.emitted)
        delta = seq.text[seq.emitted:visible]
        seq.emitted = visible
        return seq.text[:visible], delta

    # ------------------------------------------------------------ evaluation

    def score(self, token_ids: list[int], chunk_size: int | None = None,
              selector: str | None = None, token_budget: int | float | str | None = None) -> torch.Tensor:
        """Logits [T, V] (float32) of every position of `token_ids`, prefilled in chunks
        through the paged cache; used for reference checks and perplexity.

        With a selector (default: the engine's), every query attends only its own
        selected pages, as it would when decoding (the first `dense_layers` stay dense).
        """
        choice = self.selection.choice(selector, token_budget, len(token_ids))
        rid = RequestId(f"score-{next(self._ids)}")
        self._ensure_pool()
        self._check_fits(len(token_ids))
        try:
            return torch.cat(self._prefill(rid, token_ids, choice, chunk_size, select=True))
        finally:
            self.cache.free(rid)

    def score_continuation(self, prefix: list[int], continuation: list[int],
                           choices: list[tuple[str | None, int | float | str | None]],
                           chunk_size: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Scores one continuation of a prefix under several page selections, prefilling
        the prefix once (densely, as serving does).

        Returns:
            The logits [V] after the prefix (they predict continuation[0]), and for each
            (selector, token_budget) choice the logits [len(continuation), V] of the
            continuation's positions, each query reading its own selected pages:
            exactly what greedy decoding of the continuation would compute.

        Raises:
            ValueError: with a pool (the continuation's pages are rewritten per choice,
                which the pool's copies would not follow), or a bad choice.
        """
        if self.cache.store is not None:
            raise ValueError("score_continuation needs pool='none'")
        resolved = [self.selection.choice(s, b, len(prefix) + len(continuation))
                    for s, b in choices]
        dense = Choice("full", self.selection.default.token_budget)
        rid = RequestId(f"score-{next(self._ids)}")
        self._check_fits(len(prefix) + len(continuation))
        try:
            last = self._prefill(rid, prefix, dense, chunk_size, select=False)[-1][-1]
            if not self.cache.allocate(rid, len(prefix) + len(continuation)):
                raise ValueError("the continuation does not fit in the free KV pages")
            chunk = [ScheduledChunk(rid, len(prefix), len(continuation))]
            return last, [self.runner.forward(chunk, [continuation], [c], logits_for="all",
                                              select_prefill=True) for c in resolved]
        finally:
            self.cache.free(rid)

    def _prefill(self, rid: RequestId, token_ids: list[int], choice: Choice,
                 chunk_size: int | None, select: bool) -> list[torch.Tensor]:
        """Runs `token_ids` through the cache in chunks; logits of every position, per chunk."""
        chunk_size = chunk_size or self.config.scheduler.max_num_batched_tokens
        parts = []
        start = 0
        while start < len(token_ids):  # chunks shrink to what DEVICE can take
            fit = self.cache.fitting_tokens(rid, start, min(chunk_size, len(token_ids) - start))
            if fit == 0 or not self.cache.allocate(rid, start + fit):
                raise ValueError(f"{len(token_ids)} tokens do not fit in the free KV pages")
            ids = token_ids[start:start + fit]
            parts.append(self.runner.forward([ScheduledChunk(rid, start, fit)], [ids], [choice],
                                             logits_for="all", select_prefill=select))
            start += fit
        return parts

    def reset_prefix_cache(self) -> bool:
        """Drops every cached page no request reads (vLLM's name); False, dropping nothing,
        while requests still read cached pages."""
        return self.cache.reset_prefix_cache()

    def stats(self) -> dict[str, int | float | str]:
        """Counts of what happened: requests, and pages and bytes per tier."""
        pool = self.cache.pool
        stats: dict[str, int | float | str] = {
            "device_pages_total": pool.num_pages,
            "device_pages_used": pool.num_used_pages,
            "device_pages_free": pool.num_free_pages,
            "device_kv_bytes_budget": self.config.cache.device_kv_bytes,
            "device_kv_bytes_used": pool.num_used_pages * self.page_bytes,
            "page_bytes": self.page_bytes,
            "requests_running": len(self.scheduler.running),
            "requests_waiting": len(self.scheduler.waiting),
            "preemptions": self.scheduler.num_preemptions,
        }
        store = self.cache.store
        if store is not None:
            stats["pool_backend"] = self.config.pool.pool
            stats["pool_available"] = int(store.backend.is_available)
            if not store.backend.is_available:
                stats["pool_error"] = store.backend.last_error or "unknown"
            stats["codec"] = store.codec.name
            stats["kv_read"] = "in_place" if self.cache.reads_in_place else "copy"
            stats["device_pages_committed"] = self.cache.committed_pages
            stats["device_pages_held"] = self.cache.held_pages
            stats["pool_pages_reserved"] = self.cache.reserved_pool_pages
            stats["device_pages_pooled_resident"] = self.cache.num_pooled_resident
            stats.update({f"pool_{k}": v for k, v in store.backend.stats().as_dict().items()})
            stats.update(store.backend.shared_stats())
            stats.update({f"tier_{k}": v for k, v in store.counters.as_dict().items()})
        stats["summary_bytes"] = self.cache.summaries.bytes_used
        if self.cache.prefix is not None:
            slot_bytes = 0 if store is None else store.backend.slot_bytes
            stats.update(self.cache.prefix.stats(self.args.num_layers, self.page_bytes,
                                                 slot_bytes))
        stats.update(self.threads.stats())
        stats.update(self.selection.stats())
        if self.prefetcher is not None:
            stats.update(self.prefetcher.stats())
        return stats

    def generate_all(self, prompts: Iterable[str | list[int]], params: list[SamplingParams],
                     progress=None) -> list[RequestOutput]:
        """Runs prompts to completion; on any error, aborts what it added (engine stays usable)."""
        ids = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids.append(self.add_request(prompt, p))
            final: dict[str, RequestOutput] = {}
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
                        if progress is not None:
                            progress.update(1)
            return [final[i] for i in ids]
        except BaseException:
            for rid in ids:
                self.abort(rid)
            raise
