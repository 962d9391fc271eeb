"""CPU buffers on transparent huge pages, for what a stage streams through every step: its weights and KV pool.

A decode step reads every weight once, and on a CPU its speed is how fast that stream goes. With 4 KiB pages
each page of the stream costs a TLB miss and a page walk; on this project's 2-core machine one thread read
SmolLM2's 269 MB of blocked weights at 9.1 GB/s from 4 KiB pages and at 13.6 GB/s from 2 MiB ones (the same
bytes, read by numpy, which asks for huge pages for its own large arrays). Linux gives a process huge pages
where it asks (`madvise(MADV_HUGEPAGE)`, the default policy) before the memory is first touched; torch's
allocator never asks, and reuses heap memory that is already mapped in small pages.

So these buffers come from fresh anonymous mappings, 2 MiB-aligned and asked for huge pages before anything
writes them. Small buffers share mappings (chunks of `CHUNK` bytes, so a 0.6 MB projection does not waste a
2 MiB page); each tensor holds its mapping, which is unmapped when the last tensor cut from it is freed. Where
the kernel refuses (or `HEXGEN_ZMQ_HUGE_PAGES=0`), the buffers are ordinary torch ones.
"""

from __future__ import annotations

import mmap
import os
import threading

import torch

HUGE_PAGE = 2 << 20
CHUNK = 32 << 20  # bytes of one shared mapping
ALIGN = 64  # every buffer starts on a cache line


def enabled() -> bool:
    return os.environ.get("HEXGEN_ZMQ_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


class _Arena:
    """Hands out buffers cut from the current shared mapping, starting a new one when it is full."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chunk: torch.Tensor | None = None  # the current mapping as bytes, from its 2 MiB boundary
        self._used = 0

    def take(self, size: int) -> torch.Tensor | None:
        """`size` bytes, or None where the kernel refuses the mapping."""
        if size > CHUNK // 4:  # a large buffer gets a mapping of its own, a whole number of huge pages
            return _whole(size)
        with self._lock:
            if self._chunk is None or self._used + size > self._chunk.numel():
                self._chunk = _whole(CHUNK)
                self._used = 0
                if self._chunk is None:
                    return None
            buffer = self._chunk[self._used : self._used + size]
            self._used += -(-size // ALIGN) * ALIGN  # the next buffer on a cache line of its own
            return buffer


def _whole(size: int) -> torch.Tensor | None:
    """`size` bytes (rounded up to whole huge pages) of a fresh anonymous mapping of their own, from a 2 MiB
    boundary, asked for huge pages before anything writes them; None where the kernel refuses."""
    rounded = -(-size // HUGE_PAGE) * HUGE_PAGE
    try:
        # private: a shared anonymous mapping is shmem, whose huge pages follow another setting (often never)
        mapping = mmap.mmap(-1, rounded + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    # frombuffer's tensor holds the mapping (a buffer export) for as long as the tensor or a view of it lives
    whole = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE
    return whole[offset : offset + rounded][:size]


_arena = _Arena()


def empty(size: int) -> torch.Tensor:
    """`size` bytes (uint8), 64-byte aligned, on huge pages where the kernel gives them; not initialised."""
    if enabled() and size > 0:
        buffer = _arena.take(size)
        if buffer is not None:
            return buffer
    return _aligned_plain(size)


def _aligned_plain(size: int) -> torch.Tensor:
    raw = torch.empty(size + ALIGN, dtype=torch.uint8)
    offset = -raw.data_ptr() % ALIGN
    return raw[offset : offset + size]
