"""The stage process: `hexgen-zmq stage --config F --stage ID [--rank R]`.

The TP leader (rank 0) runs an asyncio loop on uvloop with three tasks: receive (drain the inbound PULL,
decode, hand each message to its handler), compute (the next micro-batch through this stage's layers, in a
worker thread so receiving overlaps computing), and heartbeat (liveness and capacity to the broker). The
first stage also owns the pipeline's scheduler; the last stage samples and sends each step's tokens both
back to the first stage and to the broker. Followers (rank > 0) have no sockets: they replay what the leader
broadcasts. Nothing a peer sends can stop the loop: bad messages are counted, logged and answered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq
import zmq.asyncio

from hexgen_zmq import kernels
from hexgen_zmq.aio import run_until_first_failure
from hexgen_zmq.block_manager import BLOCK_SIZE, blocks_for
from hexgen_zmq.checkpoint import ShardPlan
from hexgen_zmq.deployment import Deployment, DeploymentError, StageSpec, load_deployment
from hexgen_zmq.model_info import CheckpointError
from hexgen_zmq.messages import (Cancel, Feedback, Heartbeat, MicroBatch, StageFailed, StageReady, Submit,
                                 TokenRecord, Tokens)
from hexgen_zmq.model_runner import KVPool, StageModel
from hexgen_zmq.scheduler import Scheduler
from hexgen_zmq.sockets import ACTIVATION_HWM, CONTROL_MAX_BYTES, make_socket
from hexgen_zmq.stage_worker import BadBatch, StageWorker
from hexgen_zmq.tp import BATCH, KEEPALIVE, STOP, TPGroup
from hexgen_zmq.wire import DTYPES, WireError, decode, encode

HEARTBEAT_S = 0.5
CPU_KV_BYTES = 1 << 30  # default KV budget of a CPU stage
GPU_KV_FRACTION = 0.85  # of the memory left free after loading


def kv_blocks(spec: StageSpec, model: StageModel) -> int:
    """The stage's KV budget in blocks: from the deployment file, or from the memory the device has."""
    if spec.kv_cache_tokens:
        tokens = spec.kv_cache_tokens
    else:
        per_token = KVPool.bytes_per_token(len(model.layers), len(model.shard.kv_heads), model.info.head_dim,
                                           model.dtype)
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = int(free * GPU_KV_FRACTION)
        else:
            budget = CPU_KV_BYTES
        tokens = max(BLOCK_SIZE, budget // max(per_token, 1))
        tokens = min(tokens, 64 * model.info.max_positions)
    return max(1, tokens // BLOCK_SIZE)


class StageLeader:
    def __init__(self, deployment: Deployment, stage_id: str, worker: StageWorker, tp: TPGroup | None,
                 notify: str | None):
        self.deployment = deployment
        self.pipeline, self.index = deployment.stage(stage_id)
        self.spec = self.pipeline.stages[self.index]
        self.first = self.index == 0
        self.last = self.index == len(self.pipeline.stages) - 1
        self.worker, self.tp = worker, tp
        self.log = logging.getLogger(f"stage.{stage_id}")
        self.ctx = zmq.asyncio.Context()
        self.inbound = make_socket(self.ctx, zmq.PULL, bind=self.spec.inbound)
        self.to_broker = make_socket(self.ctx, zmq.PUSH, connect=deployment.broker.results, max_bytes=CONTROL_MAX_BYTES)
        self.downstream = self.to_first = None
        if not self.last:
            self.downstream = make_socket(self.ctx, zmq.PUSH, connect=self.pipeline.stages[self.index + 1].inbound)
        elif not self.first:
            self.to_first = make_socket(self.ctx, zmq.PUSH, connect=self.pipeline.stages[0].inbound)
        self.notify = make_socket(self.ctx, zmq.PUSH, connect=notify, max_bytes=CONTROL_MAX_BYTES) if notify else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"compute-{stage_id}")
        self.scheduler = None
        if self.first:
            self.scheduler = Scheduler(worker.blocks.num_blocks, worker.blocks.block_size,
                                       self.spec.max_batch_tokens, depth=len(self.pipeline.stages),
                                       micro_batches=self.pipeline.default_micro_batches())
        # bounded: a full queue stops the receive loop, and the upstream stage's send then waits at its HWM
        self.queue: asyncio.Queue[tuple[MicroBatch, torch.Tensor]] = asyncio.Queue(maxsize=ACTIVATION_HWM)
        self.wake = asyncio.Event()
        self.bad_messages = 0
        self.last_step = time.monotonic()
        self.handlers = {Submit: self.on_submit, Cancel: self.on_cancel, Feedback: self.on_feedback,
                         MicroBatch: self.on_micro_batch}

    # ------------------------------------------------------------------ receiving
    def reject(self, why: str, request_ids: list[int] = ()) -> None:
        self.bad_messages += 1
        self.log.warning("rejected message #%d: %s", self.bad_messages, why)
        if request_ids:
            self.send_broker(StageFailed(self.spec.id, f"stage {self.spec.id}: {why}", list(request_ids)))

    async def receive_loop(self) -> None:
        while True:
            frames = await self.inbound.recv_multipart(copy=False)
            try:
                message, tensors = decode(frames)
            except WireError as exc:
                self.reject(str(exc))
                continue
            handler = self.handlers.get(type(message))
            if handler is None:
                self.reject(f"unexpected {type(message).__name__}")
                continue
            try:
                result = handler(message, tensors)
                if result is not None:
                    await result
            except Exception as exc:  # a handler bug must not stop the stage
                self.log.exception("handling %s failed", type(message).__name__)
                self.reject(f"{type(message).__name__}: {exc}")

    def on_submit(self, message: Submit, tensors: list) -> None:
        if not self.first:
            return self.reject("Submit sent to a stage that is not first", [message.request_id])
        if why := self.invalid_submit(message):  # checked here too, so one bad request cannot fail a batch
            return self.reject(why, [message.request_id])
        self.scheduler.submit(message)
        self.wake.set()

    def invalid_submit(self, message: Submit) -> str | None:
        info = self.worker.model.info
        total = len(message.prompt) + message.params.max_new_tokens
        if not message.prompt:
            return "empty prompt"
        if min(message.prompt) < 0 or max(message.prompt) >= info.vocab_size:
            return "prompt token id outside the vocabulary"
        try:
            message.params.validate(info.vocab_size)
        except ValueError as exc:
            return str(exc)
        if total > info.max_positions:
            return f"{total} tokens exceed the model's context of {info.max_positions}"
        if blocks_for(total, self.worker.blocks.block_size) > self.worker.blocks.num_blocks:
            return f"{total} tokens exceed this stage's KV cache of {self.worker.capacity_tokens}"
        return None

    def on_cancel(self, message: Cancel, tensors: list) -> None:
        if self.first:
            self.scheduler.cancel(message)
            self.wake.set()

    def on_feedback(self, message: Feedback, tensors: list) -> None:
        if not self.first:
            return self.reject("feedback sent to a stage that is not first")
        if not self.scheduler.feedback(message):  # its requests were all cancelled meanwhile, or a stray
            self.log.debug("ignored feedback for micro-batch %d, not in flight", message.batch_id)
        self.wake.set()

    async def on_micro_batch(self, message: MicroBatch, tensors: list) -> None:
        ids = [seg.request_id for seg in message.segments]
        if self.first or len(tensors) != 1:
            return self.reject("micro-batch with the wrong number of tensors or sent to a first stage", ids)
        await self.queue.put((message, tensors[0]))

    # ------------------------------------------------------------------ computing
    def send_broker(self, message) -> None:
        self.to_broker.send_multipart(encode(message), copy=False)

    async def compute_loop(self) -> None:
        if not self.first:
            while True:
                batch, inputs = await self.queue.get()
                await self.run_batch(batch, inputs)
        while True:
            await self.wake.wait()
            self.wake.clear()
            self.scheduler.expire()
            while (ready := self.scheduler.next_batch()) is not None:
                batch, tokens = ready
                await self.run_batch(batch, torch.tensor(tokens, dtype=torch.int64))

    def _step(self, batch: MicroBatch, inputs: torch.Tensor):
        if self.tp is not None:
            self.tp.send(BATCH, batch, inputs)
        return self.worker.step(batch, inputs)

    async def run_batch(self, batch: MicroBatch, inputs: torch.Tensor) -> None:
        ids = [seg.request_id for seg in batch.segments]
        try:
            self.worker.check(batch, inputs)
            out = await asyncio.get_running_loop().run_in_executor(self.executor, self._step, batch, inputs)
        except BadBatch as exc:
            self.reject(str(exc), ids)
            if self.first:
                self.scheduler.feedback(Feedback(batch.batch_id, [TokenRecord(i, -1, True, str(exc)) for i in ids]))
            return
        except Exception as exc:
            self.log.exception("step failed")
            if self.tp is not None:  # a broken TP group cannot go on: the process exits and the broker is told
                self.reject(f"tensor-parallel group lost a rank ({exc})", ids)
                raise
            self.reject(f"step failed: {exc}", ids)
            return
        self.last_step = time.monotonic()
        if not self.last:
            await self.downstream.send_multipart(encode(batch, [out]), copy=False)
            return
        if batch.segments:
            feedback = Feedback(batch.batch_id, out)
            if self.first:
                self.scheduler.feedback(feedback)
                self.wake.set()
            else:
                await self.to_first.send_multipart(encode(feedback), copy=False)
        if out:
            await self.to_broker.send_multipart(encode(Tokens(self.pipeline.id, out)), copy=False)

    async def heartbeat_loop(self) -> None:
        capacity = self.worker.capacity_tokens
        while True:
            running = len(self.worker.blocks.request_ids())
            self.send_broker(Heartbeat(self.spec.id, capacity, running))
            if self.first:
                self.wake.set()  # lets the scheduler check deadlines
            if self.tp is not None and time.monotonic() - self.last_step > HEARTBEAT_S:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.tp.send, KEEPALIVE)
            await asyncio.sleep(HEARTBEAT_S)

    async def run(self) -> None:
        ready = StageReady(self.spec.id, 0, os.getpid(), self.worker.capacity_tokens)
        self.send_broker(ready)
        if self.notify is not None:
            self.notify.send_multipart(encode(ready))
        self.log.info("ready: layers %s, %d KV tokens, listening on %s", self.spec.layers,
                      self.worker.capacity_tokens, self.spec.inbound)
        await run_until_first_failure(self.receive_loop(), self.compute_loop(), self.heartbeat_loop())

    def fail(self, message: str) -> None:
        """Tell the broker (and the launcher) that this stage is gone."""
        failed = StageFailed(self.spec.id, message)
        for sock in (self.to_broker, self.notify):
            if sock is not None:
                try:
                    sock.send_multipart(encode(failed), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def close(self) -> None:
        if self.tp is not None:
            try:
                self.tp.send(STOP)
            except Exception:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.ctx.destroy(linger=200)


def follower_loop(worker: StageWorker, tp: TPGroup, log: logging.Logger) -> None:
    """Rank > 0: replay every step the leader broadcasts, until it says stop or goes silent."""
    while True:
        kind, batch, inputs = tp.receive()
        if kind == STOP:
            log.info("leader stopped")
            return
        if kind == KEEPALIVE:
            continue
        try:
            worker.step(batch, inputs)
        except BadBatch as exc:
            log.warning("rejected batch: %s", exc)


def build_worker(deployment: Deployment, stage_id: str, rank: int) -> tuple[StageWorker, TPGroup | None]:
    pipeline, index = deployment.stage(stage_id)
    spec = pipeline.stages[index]
    if not 0 <= rank < spec.tp:
        raise ValueError(f"stage {stage_id} has ranks 0..{spec.tp - 1}, not {rank}")
    device = torch.device(spec.ranks[rank].device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = TPGroup(spec.tp_init, rank, spec.tp, device) if spec.tp > 1 else None
    info = deployment.model_info()
    model = StageModel(info, spec.layers, first=index == 0, last=index == len(pipeline.stages) - 1,
                       dtype=DTYPES[deployment.model.dtype], device=device, shard=ShardPlan.make(info, rank, spec.tp),
                       group=tp.group if tp else None)
    kernels.warm_up(model, spec.max_batch_tokens)  # oneDNN's kernels for every step size, before serving
    blocks = kv_blocks(spec, model)
    if tp is not None:  # every rank must manage the same pool: agree on the smallest
        blocks = tp.agree_min(blocks)
    return StageWorker(model, blocks, BLOCK_SIZE), tp


def run_stage(config: str, stage_id: str, rank: int = 0, notify: str | None = None, threads: int | None = None) -> int:
    """Entry of a stage process: load, handshake ready, serve until stopped; tell the parent on a crash."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{stage_id}:{rank}] %(levelname)s %(message)s")
    log = logging.getLogger(f"stage.{stage_id}")
    if threads:
        torch.set_num_threads(threads)
    leader = tp = None
    try:
        deployment = load_deployment(config)
        worker, tp = build_worker(deployment, stage_id, rank)
        if rank > 0:
            follower_loop(worker, tp, log)
            return 0
        leader = StageLeader(deployment, stage_id, worker, tp, notify)
        import uvloop

        uvloop.run(leader.run())
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        if isinstance(exc, (DeploymentError, KeyError, CheckpointError)):  # a mistake in the file: no traceback
            log.error("cannot start: %s", exc.args[0] if isinstance(exc, KeyError) else exc)
        else:
            log.exception("stage failed")
        if leader is not None:
            leader.fail(f"stage {stage_id} rank {rank} failed: {exc}")
        elif notify:
            ctx = zmq.Context.instance()
            sock = make_socket(ctx, zmq.PUSH, connect=notify, max_bytes=CONTROL_MAX_BYTES)
            sock.send_multipart(encode(StageFailed(stage_id, f"rank {rank}: {exc}")))
            sock.close(linger=1000)
        return 1
    finally:
        if leader is not None:
            leader.close()
        if tp is not None:
            tp.close()
