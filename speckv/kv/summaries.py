"""Page summaries: the per-channel key min, max and mean(s) of every sealed page, per KV head.

A summary lives in fast memory for as long as its page lives, wherever the page's
data is (DEVICE or only the pool): selectors score pages from summaries without
touching the data. Each page gets a summary slot when it is allocated and gives it
back when its sequence is freed; the slot is written when the page is sealed.

Layout (one tensor, allocated once; pages that are never summarized are never
touched, so on the CPU the untouched part costs address space only)::

    data:      [num_slots, num_kv_heads, 2, head_dim]       [:, :, 0] = key min, [:, :, 1] = key max
    centroids: [num_slots, num_kv_heads, S, head_dim]    the mean key of each of the page's
                                                         S equal slices (landmarks)

(min and max of a head side by side: a quest score is one matmul of [min | max] with
[q- | q+] per KV head; the fused quest kernel reads `data` alone.) With S = 1 (the
default) the one centroid is the page's mean key; with S > 1 (`summary_slices`) the
page mean is the mean of the slices' (equal sizes: exact up to rounding), and the
`subpage` selector ranks a page by its best slice.

Summaries take (2 + S) / (2 * page_size) of the KV bytes they describe (3/32 at
16-token pages and S = 1: 1/16 the boxes, 1/32 the centroid; 6/32 with S = 4); they
are reported in `stats()` as `summary_bytes` and are not part of the DEVICE budget.
"""

from __future__ import annotations

import numpy as np
import torch

from speckv.pool.slots import SlotAllocator


class SummaryStore:
    """Key bounding boxes of pages, addressed by summary slot."""

    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device, slices: int = 1) -> None:
        self.slices = slices
        self.data = torch.empty(num_slots, num_kv_heads, 2, head_dim, dtype=dtype, device=device)
        self.centroids = torch.empty(num_slots, num_kv_heads, slices, head_dim, dtype=dtype,
                                     device=device)
        self._slots = SlotAllocator(num_slots)
        self._box_bytes = 2 * num_kv_heads * head_dim * self.data.element_size()
        self.slot_bytes = (2 + slices) * num_kv_heads * head_dim * self.data.element_size()

    @property
    def num_used(self) -> int:
        return self._slots.num_used

    @property
    def bytes_used(self) -> int:
        return self.num_used * self.slot_bytes

    def allocate(self, n: int) -> np.ndarray:
        ids = self._slots.allocate(n)
        if ids is None:
            raise RuntimeError("bug: more live pages than summary slots")
        return ids

    def free(self, ids: np.ndarray) -> None:
        self._slots.free(ids)

    def summarize(self, ids: torch.Tensor, keys: torch.Tensor) -> None:
        """Writes the summaries of sealed pages.

        Args:
            ids: [S] summary slots.
            keys: [S, page_size, Hkv, D] the pages' keys.
        """
        lo, hi = torch.aminmax(keys, dim=1)  # [S, Hkv, D] each
        self.data[ids] = torch.stack([lo, hi], dim=2)
        n, page_size, num_kv, dim = keys.shape
        sliced = keys.reshape(n, self.slices, page_size // self.slices, num_kv, dim)
        means = sliced.mean(dim=2, dtype=torch.float32).transpose(1, 2)  # [S, Hkv, slices, D]
        self.centroids[ids] = means.to(self.centroids.dtype)

    def to_bytes(self, ids: np.ndarray) -> np.ndarray:
        """The summaries in slots `ids` (any shape) as host bytes: uint8 [*ids.shape, slot_bytes]
        (boxes, then centroids)."""
        index = torch.from_numpy(np.ascontiguousarray(ids).reshape(-1)).to(self.data.device)
        n = index.numel()
        rows = torch.cat([self.data.index_select(0, index).reshape(n, -1),
                          self.centroids.index_select(0, index).reshape(n, -1)], dim=1)
        return rows.cpu().contiguous().view(torch.uint8).numpy().reshape(*ids.shape,
                                                                         self.slot_bytes)

    def from_bytes(self, ids: np.ndarray, data: np.ndarray) -> None:
        """Writes summaries given as `to_bytes` returns them into slots `ids`."""
        index = torch.from_numpy(np.ascontiguousarray(ids).reshape(-1)).to(self.data.device)
        rows = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, self.slot_bytes))
        boxes, centroids = rows[:, :self._box_bytes], rows[:, self._box_bytes:]
        self.data[index] = boxes.contiguous().view(self.data.dtype).view(
            -1, *self.data.shape[1:]).to(self.data.device)
        self.centroids[index] = centroids.contiguous().view(self.centroids.dtype).view(
            -1, *self.centroids.shape[1:]).to(self.centroids.device)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, P] -> [B, P, Hkv, 2, D]."""
        return _gather(self.data, ids)

    def gather_centroids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, P] -> [B, P, Hkv, S, D] the slices' mean keys (S = 1: the page's)."""
        return _gather(self.centroids, ids)


def _gather(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    rows = table.view(table.shape[0], -1).index_select(0, ids.reshape(-1))  # 2-D: fastest
    return rows.view(*ids.shape, *table.shape[1:])
