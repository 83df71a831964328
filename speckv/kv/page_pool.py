"""The DEVICE tier: one preallocated tensor of KV pages and its free list.

Layout (one tensor, allocated once; each page is one sequence, one layer)::

    kv[0] = K pages: [num_pages, page_size, num_kv_heads, head_dim]
    kv[1] = V pages: [num_pages, page_size, num_kv_heads, head_dim]

Token-major pages make a gathered run of pages a contiguous [tokens, Hkv, D] view
and make an append one row write at `slot = page_id * page_size + offset`.
"""

from __future__ import annotations

from collections import deque
from typing import NewType

import torch

PageId = NewType("PageId", int)


class DevicePagePool:
    """A fixed number of pages in fast memory, allocated and freed by id."""

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device) -> None:
        if num_pages < 1:
            raise ValueError("the DEVICE tier must hold at least one page")
        self.num_pages = num_pages
        self.page_size = page_size
        self.kv = torch.zeros(2, num_pages, page_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)
        self.k_pages, self.v_pages = self.kv[0], self.kv[1]
        self._free: deque[PageId] = deque(PageId(i) for i in range(num_pages))

    @staticmethod
    def page_bytes(page_size: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
        """Bytes of one page: K and V of `page_size` tokens for every KV head."""
        return 2 * page_size * num_kv_heads * head_dim * element_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[PageId] | None:
        """Takes `n` free pages (lowest ids first), or returns None if there are fewer."""
        if n > len(self._free):
            return None
        return [self._free.popleft() for _ in range(n)]

    def free(self, pages: list[PageId]) -> None:
        self._free.extend(pages)
        if len(self._free) > self.num_pages:
            raise RuntimeError("bug: a page was freed twice (free list exceeds the pool)")
