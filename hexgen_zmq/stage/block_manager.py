"""KV-cache bookkeeping, torch-free: which fixed-size blocks of the cache pool each request owns.

A request reserves the blocks its whole life may need (prompt + max_new_tokens) when it is admitted, so an
admitted request can never run out of cache; blocks are handed out as its tokens arrive and all come back
when it finishes, is cancelled, or expires. Every rank of a stage replays the same operations in the same
order, so their tables stay identical without talking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLOCK_SIZE = 16


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


@dataclass
class RequestBlocks:
    reserved: int  # blocks promised to this request
    table: list[int] = field(default_factory=list)  # blocks handed out, in position order


class CacheFull(RuntimeError):
    """No room to admit a request (callers queue it) or a request grew past its reservation (a bug)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low block numbers first
        self._requests: dict[int, RequestBlocks] = {}
        self._reserved = 0

    @property
    def free_blocks(self) -> int:
        """Blocks not promised to any request."""
        return self.num_blocks - self._reserved

    @property
    def used_blocks(self) -> int:
        """Blocks handed out to requests' tables."""
        return self.num_blocks - len(self._free)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._requests

    def can_admit(self, tokens: int) -> bool:
        return blocks_for(tokens, self.block_size) <= self.free_blocks

    def admit(self, request_id: int, tokens: int) -> None:
        """Reserve room for `tokens` positions of a new request."""
        if request_id in self._requests:
            raise CacheFull(f"request {request_id} is already admitted")
        need = blocks_for(tokens, self.block_size)
        if need > self.free_blocks:
            raise CacheFull(f"request {request_id} needs {need} blocks, {self.free_blocks} free")
        self._requests[request_id] = RequestBlocks(need)
        self._reserved += need

    def grow(self, request_id: int, length: int) -> list[int]:
        """Make the request's table cover positions [0, length); returns the table."""
        entry = self._requests[request_id]
        need = blocks_for(length, self.block_size)
        if need > entry.reserved:
            raise CacheFull(f"request {request_id} grew to {length} tokens, past its reservation")
        while len(entry.table) < need:
            entry.table.append(self._free.pop())
        return entry.table

    def table(self, request_id: int) -> list[int]:
        return self._requests[request_id].table

    def release(self, request_id: int) -> bool:
        """Give back everything the request holds; False when it held nothing."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        self._free.extend(reversed(entry.table))
        self._reserved -= entry.reserved
        return True

    def request_ids(self) -> list[int]:
        return list(self._requests)
