"""The DEVICE tier: one preallocated tensor of KV pages and its free slots.

Layout (one tensor, allocated once; each page is one sequence, one layer)::

    kv[0] = K pages: [num_pages, page_size, num_kv_heads, head_dim]
    kv[1] = V pages: [num_pages, page_size, num_kv_heads, head_dim]

Token-major pages make a gathered run of pages a contiguous [tokens, Hkv, D] view
and make an append one row write at `slot = page_id * page_size + offset`.
"""

from __future__ import annotations

from typing import NewType

import numpy as np
import torch

from speckv.pool.slots import SlotAllocator

PageId = NewType("PageId", int)


class DevicePagePool:
    """A fixed number of pages in fast memory, allocated and freed by id.

    With `spare` pages, the tensor holds that many more, owned by a second pool over
    the same tensor (`spare_pool`, the PREFETCH tier): each pool keeps its own budget,
    and `exchange` hands a page from one to the other without copying it::

        kv[:, 0 : num_pages]                    this pool's slots at first
        kv[:, num_pages : num_pages + spare]    the spare pool's slots at first
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device, spare: int = 0) -> None:
        if num_pages < 1:
            raise ValueError("the DEVICE tier must hold at least one page")
        self.num_pages = num_pages
        self.num_spare = spare
        self.page_size = page_size
        self.kv = torch.zeros(2, num_pages + spare, page_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)
        self.k_pages, self.v_pages = self.kv[0], self.kv[1]
        self._slots = SlotAllocator(num_pages, arena=num_pages + spare)

    @property
    def num_slots(self) -> int:
        """Slot ids in the tensor: arrays indexed by slot are this long."""
        return self.kv.shape[1]

    def spare_pool(self) -> "DevicePagePool":
        """A pool of the `spare` pages over the same tensor (made once, by the owner of
        the PREFETCH tier)."""
        if self.num_spare == 0:
            raise ValueError("this pool has no spare pages")
        spare = object.__new__(DevicePagePool)
        spare.num_pages, spare.num_spare, spare.page_size = self.num_spare, 0, self.page_size
        spare.kv, spare.k_pages, spare.v_pages = self.kv, self.k_pages, self.v_pages
        spare._slots = SlotAllocator(self.num_spare, first=self.num_pages, arena=self.num_slots)
        return spare

    def exchange(self, give: np.ndarray, take: np.ndarray) -> None:
        """This pool's pages `give` become another pool's and that pool's pages `take`
        (same tensor) become this one's, in use; the other pool does the converse."""
        self._slots.exchange(give, take)

    @staticmethod
    def page_bytes(page_size: int, num_kv_heads: int, head_dim: int, element_size: int) -> int:
        """Bytes of one page: K and V of `page_size` tokens for every KV head."""
        return 2 * page_size * num_kv_heads * head_dim * element_size

    @property
    def num_free_pages(self) -> int:
        return self._slots.num_free

    @property
    def num_used_pages(self) -> int:
        return self._slots.num_used

    def can_allocate(self, n: int) -> bool:
        return n <= self._slots.num_free

    def allocate(self, n: int) -> np.ndarray | None:
        """Takes `n` free pages (int64 ids), or returns None if there are fewer."""
        return self._slots.allocate(n)

    def free(self, pages: np.ndarray | list[PageId]) -> None:
        self._slots.free(np.asarray(pages, dtype=np.int64))
