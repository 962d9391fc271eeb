"""Weights and KV pools on transparent huge pages (`hexgen_zmq.model.huge_pages`): aligned buffers of the
size asked, shared mappings for small ones, huge pages where the kernel gives them, and plain torch memory
where it is switched off."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from hexgen_zmq.model import huge_pages, kernels

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_kib() -> int:
    return int(Path("/proc/self/smaps_rollup").read_text().split("AnonHugePages:")[1].split()[0])


def test_buffers_are_aligned_sized_and_do_not_overlap():
    buffers = [huge_pages.empty(size) for size in (1, 63, 64, 1000, 5 << 20, 9 << 20, 3)]
    spans = []
    for buffer, size in zip(buffers, (1, 63, 64, 1000, 5 << 20, 9 << 20, 3)):
        assert buffer.dtype == torch.uint8 and buffer.numel() == size and buffer.is_contiguous()
        assert buffer.data_ptr() % 64 == 0
        spans.append((buffer.data_ptr(), buffer.data_ptr() + size))
        buffer.fill_(len(spans))  # every byte writable
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert [int(b[0]) for b in buffers] == list(range(1, 8))


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_large_buffers_get_huge_pages_and_are_unmapped_when_freed():
    if not huge_pages.enabled():
        pytest.skip("switched off")
    before = huge_kib()
    buffer = huge_pages.empty(16 << 20)
    buffer.fill_(1)
    assert buffer.data_ptr() % huge_pages.HUGE_PAGE == 0
    grown = huge_kib() - before
    if grown == 0:
        pytest.skip("the kernel gave no huge page (memory too fragmented)")
    assert grown >= 8 << 10  # most of the 16 MiB
    del buffer
    gc.collect()
    assert huge_kib() - before < grown  # the mapping went with its last tensor


def test_switched_off_gives_plain_aligned_memory(monkeypatch):
    monkeypatch.setenv("HEXGEN_ZMQ_HUGE_PAGES", "0")
    buffer = huge_pages.empty(5 << 20)
    assert buffer.numel() == 5 << 20 and buffer.data_ptr() % 64 == 0


@pytest.mark.skipif(not kernels.blocked_usable(torch.float32), reason="no blocked products here")
def test_a_blocked_linear_keeps_its_weights_alive_on_huge_pages():
    linear = nn.Linear(576, 3072, bias=False)
    blocked = kernels.BlockedLinear(linear)
    ref = weakref.ref(blocked.blocked)
    x = torch.randn(4, 576)
    gc.collect()
    with torch.inference_mode():
        assert torch.allclose(blocked(x), linear(x), atol=1e-4, rtol=1e-4)
    del blocked
    gc.collect()
    assert ref() is None
