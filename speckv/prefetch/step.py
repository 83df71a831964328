"""The prefetcher's side of one engine step, held by `StepAttention`."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from speckv.kv.cache import KVCacheManager
from speckv.prefetch.predictors import StepView
from speckv.prefetch.prefetcher import Prefetcher
from speckv.selection.step import StepSelection

QueryFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
"""(layer, x [T, hidden], positions [T]) -> that layer's queries [T, H, D]."""


class StepPrefetch:
    """Tells the prefetcher what the step reads, layer by layer, and answers its
    predictors' questions about the step (dense rows, estimated selections)."""

    def __init__(self, prefetcher: Prefetcher, cache: KVCacheManager, request_ids: list,
                 context_lens: list[int], max_pages: int, num_decode: int,
                 selection: StepSelection | None, positions: torch.Tensor,
                 summary_tables: torch.Tensor | None, query_for: QueryFn | None) -> None:
        self.cache = cache
        self.prefetcher = prefetcher
        self.selection = selection
        self.positions = positions
        self.summary_tables = summary_tables
        self.query_for = query_for
        self.num_decode = num_decode
        ps = cache.page_size
        num_pages = np.array([-(-n // ps) for n in context_lens], dtype=np.int64)
        self._dense_rows = np.ones(len(request_ids), dtype=bool) if selection is None else \
            selection.dense_rows(len(request_ids)).numpy()
        self._dense_rows[num_decode:] = True  # prefill chunks read every page
        can_predict = selection is not None and query_for is not None and summary_tables is not None
        self.view = StepView(0, list(request_ids), num_pages, max_pages, cache.num_layers,
                             self._dense, self._predict if can_predict else None, num_decode)
        self.prefetcher.begin_step(self.view, cache)

    def _dense(self, layer: int) -> np.ndarray:
        if self.selection is None or not self.selection.sparse(layer):
            return np.ones(len(self._dense_rows), dtype=bool)
        return self._dense_rows

    def _predict(self, layer: int, x: torch.Tensor) -> np.ndarray:
        """[B, P]: the pages `layer` would select for queries estimated from x."""
        n, view = self.num_decode, self.view
        pages = view.all_pages.copy()
        if n == 0:
            return pages
        positions = self.positions[:n]
        q = self.query_for(layer, x[:n], positions)  # [n, H, D]
        rows = torch.arange(n)
        sids = self.summary_tables[layer]
        summaries = self.cache.summaries

        def gather(local: torch.Tensor) -> torch.Tensor:
            return summaries.gather(sids[rows[local]])

        def centroids(local: torch.Tensor) -> torch.Tensor:
            return summaries.gather_centroids(sids[rows[local]])

        mask = self.selection.predict(rows, q[:, None], positions[:, None], gather,
                                      view.max_pages, centroids)  # [n, 1, Hkv, P]
        pages[:n] = mask.any(2).any(1).cpu().numpy() & view.all_pages[:n]
        return pages

    def layer_input(self, layer: int, x: torch.Tensor) -> None:
        self.prefetcher.layer_input(layer, x)

    def after_read(self, layer: int, needed: torch.Tensor | None) -> None:
        """`layer` has read `needed` [B, P] (None: every page) and its pages are resident."""
        self.prefetcher.after_read(layer, None if needed is None else needed.cpu().numpy())

    def finish(self) -> None:
        self.prefetcher.end_step()
