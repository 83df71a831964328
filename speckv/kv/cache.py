"""Page tables per sequence and the cache manager that grows and frees them.

A sequence owns one page per layer for every `page_size` tokens: its page table
is `[num_layers, num_logical_pages]` physical `PageId`s. Layers have their own
pages (not one block shared by all layers, as in vLLM) because later tiers evict,
fetch and select pages per layer.
"""

from __future__ import annotations

from typing import NewType

import torch

from speckv.kv.page_pool import DevicePagePool, PageId

RequestId = NewType("RequestId", str)


class PageTable:
    """The pages of one sequence: `pages[layer][i]` holds tokens [i*ps, (i+1)*ps)."""

    def __init__(self, num_layers: int, max_pages: int, device: torch.device) -> None:
        self.pages: list[list[PageId]] = [[] for _ in range(num_layers)]
        # Device mirror of `pages`, so a step can stack tables without Python loops.
        self.tensor = torch.zeros(num_layers, max_pages, dtype=torch.long, device=device)

    @property
    def num_logical_pages(self) -> int:
        return len(self.pages[0])

    def append(self, per_layer: list[PageId]) -> None:
        index = self.num_logical_pages
        for layer_pages, page in zip(self.pages, per_layer):
            layer_pages.append(page)
        self.tensor[:, index] = torch.tensor(per_layer, dtype=torch.long)

    def all_pages(self) -> list[PageId]:
        return [page for layer_pages in self.pages for page in layer_pages]


class KVCacheManager:
    """Allocates pages for sequences as they grow and frees them when they end."""

    def __init__(self, pool: DevicePagePool, num_layers: int, max_model_len: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.page_size = pool.page_size
        self.max_pages_per_seq = -(-max_model_len // self.page_size)
        self._tables: dict[RequestId, PageTable] = {}

    def pages_needed(self, request_id: RequestId, num_tokens: int) -> int:
        """Physical pages to allocate so that the sequence can hold `num_tokens` tokens."""
        table = self._tables.get(request_id)
        have = 0 if table is None else table.num_logical_pages
        return max(0, -(-num_tokens // self.page_size) - have) * self.num_layers

    def can_allocate(self, request_id: RequestId, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.pages_needed(request_id, num_tokens))

    def allocate(self, request_id: RequestId, num_tokens: int) -> bool:
        """Grows the sequence's table to hold `num_tokens`; False (nothing taken) if no room."""
        needed = self.pages_needed(request_id, num_tokens)
        if needed == 0:
            return True
        pages = self.pool.allocate(needed)
        if pages is None:
            return False
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = PageTable(
                self.num_layers, self.max_pages_per_seq, self.pool.kv.device)
        for i in range(0, needed, self.num_layers):
            table.append(pages[i:i + self.num_layers])
        return True

    def free(self, request_id: RequestId) -> None:
        table = self._tables.pop(request_id, None)
        if table is not None:
            self.pool.free(table.all_pages())

    def table(self, request_id: RequestId) -> PageTable:
        return self._tables[request_id]

    def num_sequences(self) -> int:
        return len(self._tables)

    def block_tables(self, request_ids: list[RequestId], num_pages: int) -> torch.Tensor:
        """Stacked page tables of a batch: [num_layers, B, num_pages]."""
        return torch.stack([self._tables[r].tensor[:, :num_pages] for r in request_ids], dim=1)
