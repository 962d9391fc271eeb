"""A stage's tensor-parallel group: its own small torch.distributed world (NCCL on GPUs, gloo on CPUs).

Only the leader (rank 0) holds sockets; it broadcasts each micro-batch to the followers as raw bytes (the
wire codec's header frame and the input tensor), never pickled objects. When idle it broadcasts a
keep-alive, so a follower's wait can carry a timeout: a dead leader or follower surfaces as an error within
`timeout_s`, never as a hang.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from hexgen_zmq.wire.messages import HEADER_DECODER, MicroBatch
from hexgen_zmq.wire.codec import DTYPES, encode

log = logging.getLogger(__name__)

KEEPALIVE, BATCH, STOP = 0, 1, 2


class TPGroup:
    """Two groups over the same ranks: the world, with the long `start_timeout_s` for what ranks do at
    their own speed while they start (loading, warming up, agreeing on the cache size), and `group`, with
    the short `timeout_s`, for serving, where a silent rank is a dead one."""

    def __init__(self, init_method: str, rank: int, size: int, device: torch.device, timeout_s: float = 10.0,
                 start_timeout_s: float = 600.0):
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A stage's ranks share a host (checked at load): its rendezvous and its collectives stay on
        # loopback, whatever address tp_init names, so nothing of a TP group is reachable from elsewhere.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
        self._listener = None
        store = self._loopback_store(init_method, rank, size, timedelta(seconds=start_timeout_s))
        dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                timeout=timedelta(seconds=start_timeout_s))
        self.world = dist.group.WORLD
        self.group = dist.new_group(list(range(size)), timeout=timedelta(seconds=timeout_s), backend=backend)
        self.rank, self.size = rank, size
        self.device = device if backend == "nccl" else torch.device("cpu")

    def _loopback_store(self, init_method: str, rank: int, size: int, timeout: timedelta) -> dist.TCPStore:
        """The group's key-value store on 127.0.0.1 at tp_init's port: rank 0 binds the listening socket
        itself (torch's own store would listen on every interface) and hands it to the store."""
        port = int(init_method.rpartition(":")[2])
        if rank == 0:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", port))
            self._listener.listen(128)
            return dist.TCPStore("127.0.0.1", port, size, True, timeout, master_listen_fd=self._listener.fileno())
        return dist.TCPStore("127.0.0.1", port, size, False, timeout)

    def _bcast(self, tensor: torch.Tensor) -> torch.Tensor:
        moved = tensor.to(self.device)
        dist.broadcast(moved, src=0, group=self.group)
        return moved

    def send(self, kind: int, batch: MicroBatch | None = None, inputs: torch.Tensor | None = None) -> None:
        """Leader: announce the next step (or a keep-alive / stop) to the followers."""
        header = bytes(encode(batch, [inputs])[0]) if kind == BATCH else b""
        self._bcast(torch.tensor([kind, len(header)], dtype=torch.int64))
        if kind == BATCH:
            self._bcast(torch.frombuffer(bytearray(header), dtype=torch.uint8))
            self._bcast(inputs.contiguous())

    def receive(self) -> tuple[int, MicroBatch | None, torch.Tensor | None]:
        """Follower: wait for the leader's next announcement."""
        kind, header_len = self._bcast(torch.zeros(2, dtype=torch.int64)).cpu().tolist()
        if kind != BATCH:
            return kind, None, None
        header = HEADER_DECODER.decode(self._bcast(torch.zeros(header_len, dtype=torch.uint8)).cpu().numpy().tobytes())
        meta = header.tensors[0]
        inputs = self._bcast(torch.empty(meta.shape, dtype=DTYPES[meta.dtype]))
        return BATCH, header.body, inputs

    def agree_min(self, value: int) -> int:
        """The smallest of every rank's value (e.g. KV blocks derived from each GPU's free memory)."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.world)  # ranks arrive as they finish loading
        return int(tensor.item())

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

