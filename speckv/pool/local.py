"""`local`: the pool in this process's host memory.

Pinned when the device is CUDA (so copies to the device can be asynchronous);
bound to a NUMA node with `pool_numa_node`, which is how a CXL memory expander
appears to Linux (a CPU-less NUMA node). The arena is allocated untouched, so
the OS commits memory only as pages are stored.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import torch

from speckv.pool.base import ArenaPool, PoolKey
from speckv.pool.slots import SlotAllocator

logger = logging.getLogger(__name__)

_SYS_MBIND = 237  # x86_64
_MPOL_BIND = 2
_NODES = Path("/sys/devices/system/node")


def numa_nodes() -> list[int]:
    """The NUMA nodes Linux reports (empty where there is no NUMA information)."""
    if not _NODES.is_dir():
        return []
    return sorted(int(p.name[4:]) for p in _NODES.glob("node[0-9]*"))


def bind_to_numa_node(tensor: torch.Tensor, node: int) -> None:
    """Binds the (untouched) memory of `tensor` to NUMA node `node` with mbind(2)."""
    nodes = numa_nodes()
    if node not in nodes:
        raise ValueError(f"pool_numa_node={node}: this machine has NUMA nodes "
                         f"{nodes or 'none'}; a CXL expander shows up as an extra node")
    if os.uname().machine != "x86_64":
        raise ValueError("pool_numa_node is supported on x86_64 Linux only")
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned = (start + page - 1) // page * page
    length = (end - aligned) // page * page
    mask = ctypes.c_ulong(1 << node)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_MBIND, ctypes.c_void_p(aligned), ctypes.c_ulong(length), _MPOL_BIND,
                    ctypes.byref(mask), ctypes.c_ulong(64), 0) != 0:
        raise ValueError(f"mbind to NUMA node {node} failed: {os.strerror(ctypes.get_errno())}")


class LocalPool(ArenaPool):
    """Slots in one host tensor of this process."""

    def __init__(self, slot_bytes: int, capacity_bytes: int, *, device: torch.device,
                 numa_node: int | None = None, **_: object) -> None:
        super().__init__(slot_bytes)
        num_slots = capacity_bytes // slot_bytes
        if num_slots < 1:
            raise ValueError(f"pool_bytes={capacity_bytes} is smaller than one page slot "
                             f"({slot_bytes} bytes)")
        arena = torch.empty(num_slots, slot_bytes, dtype=torch.uint8,
                            pin_memory=device.type == "cuda")
        if numa_node is not None:
            bind_to_numa_node(arena, numa_node)
        self._attach_arena(arena)
        self._slots = SlotAllocator(num_slots)

    @property
    def num_free(self) -> int:
        return self._slots.num_free

    def allocate(self, n: int) -> list[PoolKey] | None:
        ids = self._slots.allocate(n)
        return None if ids is None else ids.tolist()

    def free(self, keys: list[PoolKey]) -> None:
        if keys:
            self._forget(keys)
            self._slots.free(keys)
