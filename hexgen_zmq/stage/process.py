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
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq
import zmq.asyncio

from hexgen_zmq.model import kernels
from hexgen_zmq.operations.aio import run_until_first_failure
from hexgen_zmq.stage.block_manager import BLOCK_SIZE, blocks_for
from hexgen_zmq.model.checkpoint import ShardPlan
from hexgen_zmq.operations.deployment import Deployment, DeploymentError, StageSpec, load_deployment
from hexgen_zmq.model.info import CheckpointError
from hexgen_zmq.stage.core_share import CoreShare, machine_cores
from hexgen_zmq.stage.faults import Faults
from hexgen_zmq.wire.messages import (BrokerEpoch, Cancel, Feedback, Heartbeat, MicroBatch, StageCounters, StageFailed,
                                 StageReady, Submit, Tokens)
from hexgen_zmq.model.runner import KVPool, StageModel
from hexgen_zmq.wire.security import ProcessSecurity, SecurityError, stage_domain
from hexgen_zmq.stage.scheduler import Scheduler
from hexgen_zmq.wire.sockets import ACTIVATION_HWM, ACTIVATION_MAX_BYTES, CONTROL_MAX_BYTES, make_socket, send_now
from hexgen_zmq.stage.worker import BadBatch, StageWorker, StepResult, failure
from hexgen_zmq.stage.tp import BATCH, KEEPALIVE, STOP, TPGroup
from hexgen_zmq.wire.codec import DTYPES, WireError, decode, encode

HEARTBEAT_S = 0.5
IDLE_SWEEP_S = 5.0  # how often a stage looks for requests nobody runs any more
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


def frames_bytes(frames) -> int:
    return sum(memoryview(frame).nbytes for frame in frames)


class StageLeader:
    def __init__(self, deployment: Deployment, stage_id: str, worker: StageWorker, tp: TPGroup | None,
                 notify: str | None, faults: Faults | None = None, security: ProcessSecurity | None = None):
        self.deployment = deployment
        self.pipeline, self.index = deployment.stage(stage_id)
        self.spec = self.pipeline.stages[self.index]
        self.version = deployment.pipeline_version(self.pipeline)  # on every message to the broker
        self.first = self.index == 0
        self.last = self.index == len(self.pipeline.stages) - 1
        self.worker, self.tp = worker, tp
        self.faults = faults or Faults()
        self.log = logging.getLogger(f"stage.{stage_id}")
        self.ctx = zmq.asyncio.Context()
        self.security = security
        self.domain = stage_domain(stage_id)
        if security is not None:
            security.start(self.ctx)
        # The first stage only receives control messages and token ids (Submit, Cancel, Feedback).
        inbound_limit = CONTROL_MAX_BYTES if self.first else ACTIVATION_MAX_BYTES
        self.inbound = make_socket(self.ctx, zmq.PULL, bind=self.spec.inbound, max_bytes=inbound_limit,
                                   security=security, domain=self.domain)
        self.to_broker = make_socket(self.ctx, zmq.PUSH, connect=deployment.broker.results, max_bytes=CONTROL_MAX_BYTES,
                                     security=security)
        self.downstream = self.to_first = None
        if not self.last:
            self.downstream = make_socket(self.ctx, zmq.PUSH, connect=self.pipeline.stages[self.index + 1].inbound,
                                          security=security)
        elif not self.first:
            self.to_first = make_socket(self.ctx, zmq.PUSH, connect=self.pipeline.stages[0].inbound, security=security)
        self.notify = make_socket(self.ctx, zmq.PUSH, connect=notify, max_bytes=CONTROL_MAX_BYTES) if notify else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"compute-{stage_id}")
        self.scheduler = None
        if self.first:
            self.scheduler = Scheduler(worker.blocks.num_blocks, worker.blocks.block_size,
                                       self.spec.max_batch_tokens, depth=len(self.pipeline.stages),
                                       micro_batches=self.pipeline.default_micro_batches(),
                                       max_waiting=deployment.broker.queue_limit + 4 * worker.blocks.num_blocks)
        # bounded: a full queue stops the receive loop, and the upstream stage's send then waits at its HWM
        self.queue: asyncio.Queue[tuple[MicroBatch, torch.Tensor]] = asyncio.Queue(maxsize=ACTIVATION_HWM)
        self.wake = asyncio.Event()
        self.bad_messages = 0
        self.dropped_sends = 0
        self.incarnation = secrets.randbits(63)
        self.broker_epoch = 0  # the newest broker incarnation seen; requests of older ones are orphans
        self.batches_received = 0
        self.step_started: float | None = None  # monotonic start of the step now computing
        # cumulative, reported in heartbeats (StageCounters)
        self.steps = self.step_tokens = self.step_requests = self.bytes_sent = self.broker_bytes_sent = 0
        self.step_seconds = 0.0
        self.last_step = time.monotonic()  # when the executor last ran something for the TP group
        self.handlers = {Submit: self.on_submit, Cancel: self.on_cancel, Feedback: self.on_feedback,
                         MicroBatch: self.on_micro_batch, BrokerEpoch: self.on_broker_epoch}

    # ------------------------------------------------------------------ receiving
    def reject(self, why: str, request_ids: list[int] = (), code: str = "stage_failed") -> None:
        self.bad_messages += 1
        self.log.warning("rejected message #%d: %s", self.bad_messages, why)
        if request_ids:
            self.send_broker(StageFailed(self.spec.id, f"stage {self.spec.id}: {why}", list(request_ids), code,
                                         self.incarnation, self.version))

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
            if self.security is not None and not self.security.admits(self.domain, frames[0], type(message).__name__):
                continue  # an authenticated peer sending what its role does not: counted per peer and reason
            try:
                result = handler(message, tensors)
                if result is not None:
                    await result
            except Exception as exc:  # a handler bug must not stop the stage
                self.log.exception("handling %s failed", type(message).__name__)
                self.reject(f"{type(message).__name__}: {exc}")

    def adopt_broker(self, epoch: int) -> bool:
        """Follow the newest broker incarnation; False for a message of an older one (a stale broker)."""
        if epoch < self.broker_epoch:
            return False
        if epoch > self.broker_epoch:
            previous, self.broker_epoch = self.broker_epoch, epoch
            if self.first and previous:
                orphans = self.scheduler.requests_of_other_brokers(epoch)
                if orphans:
                    self.log.info("broker restarted: dropping %d requests of its previous incarnation", len(orphans))
                    self.scheduler.cancel(Cancel(orphans, "broker restarted"))
                    self.wake.set()
        return True

    def on_broker_epoch(self, message: BrokerEpoch, tensors: list) -> None:
        if self.first:
            self.adopt_broker(message.broker)

    def on_submit(self, message: Submit, tensors: list) -> None:
        if not self.first:
            return self.reject("Submit sent to a stage that is not first", [message.request_id])
        if tensors:
            return self.reject("Submit with tensors", [message.request_id])
        if message.version and message.version != self.version:  # sent to the pipeline this one replaced
            return self.reject(f"Submit for pipeline version {message.version}, this stage is {self.version}")
        if not self.adopt_broker(message.broker):
            return self.reject(f"Submit from a broker incarnation ({message.broker}) older than the one served")
        if why := self.invalid_submit(message):  # checked here too, so one bad request cannot fail a batch
            return self.reject(why, [message.request_id], "invalid_request")
        if not self.scheduler.submit(message):
            if message.request_id in self.scheduler.running or message.request_id in self.scheduler.waiting_ids:
                return self.reject(f"duplicate Submit of request {message.request_id}")
            return self.reject(f"{len(self.scheduler.waiting)} requests already wait", [message.request_id], "busy")
        self.wake.set()

    def invalid_submit(self, message: Submit) -> str | None:
        info = self.worker.model.info
        total = len(message.prompt) + message.params.max_new_tokens
        if not message.prompt:
            return "empty prompt"
        if max(message.prompt) >= info.vocab_size or (message.eos_token_ids and max(message.eos_token_ids) >= info.vocab_size):
            return "prompt token id outside the vocabulary"
        try:
            message.params.validate(info.vocab_size)
        except ValueError as exc:
            return str(exc)
        if message.timeout_s is not None and not 0 < message.timeout_s < 1e9:
            return f"timeout_s must be in (0, 1e9), got {message.timeout_s!r}"
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
        self.batches_received += 1
        if self.batches_received == self.faults.drop_batch:
            self.log.warning("fault injected: dropping micro-batch %d", message.batch_id)
            return
        await self.queue.put((message, tensors[0]))

    # ------------------------------------------------------------------ computing
    def send_broker(self, message) -> None:
        """Control messages to the broker never wait: when it is down and its queue is full, they are dropped
        (and counted) instead of piling up as unawaited sends."""
        if not send_now(self.to_broker, encode(message)):
            self.dropped_sends += 1

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

    def _step(self, batch: MicroBatch, inputs: torch.Tensor) -> StepResult:
        self.last_step = time.monotonic()
        if self.tp is not None:
            self.tp.send(BATCH, batch, inputs)
        if self.faults.slow_step_s and any(seg.n_tokens > 1 for seg in batch.segments):
            self.log.warning("fault injected: this step takes %.1f s longer", self.faults.slow_step_s)
            time.sleep(self.faults.slow_step_s)
            self.faults.slow_step_s = 0.0
        return self.worker.step(batch, inputs)

    def _keepalive(self) -> None:
        if time.monotonic() - self.last_step > HEARTBEAT_S:
            self.last_step = time.monotonic()
            self.tp.send(KEEPALIVE)

    async def run_batch(self, batch: MicroBatch, inputs: torch.Tensor) -> None:
        try:
            self.worker.check(batch, inputs)
        except BadBatch as exc:  # the batch contradicts itself: a peer's error, nothing of it runs
            ids = [seg.request_id for seg in batch.segments]
            self.reject(str(exc), ids)
            if self.first:
                self.scheduler.feedback(Feedback(batch.batch_id, [failure(i, str(exc)) for i in ids]))
            return
        self.step_started = time.monotonic()
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.executor, self._step, batch, inputs)
        except Exception as exc:
            # The worker fails requests itself; what reaches here is the TP group breaking (a rank died or
            # timed out), which no later step can survive: the process exits and the broker is told.
            self.log.exception("step failed")
            self.reject(f"tensor-parallel group lost a rank ({exc})", [seg.request_id for seg in batch.segments])
            raise
        finally:
            self.steps += 1
            self.step_seconds += time.monotonic() - self.step_started
            self.step_started = None
        self.step_tokens += sum(seg.n_tokens for seg in batch.segments)
        self.step_requests += len(batch.segments)
        if len(result.batch.failed) > len(batch.failed):  # part of the batch could not run here: a peer's error
            own = result.batch.failed[len(batch.failed):]
            self.bad_messages += 1
            self.log.warning("failed %d requests alone: %s", len(own), "; ".join(r.reason or "" for r in own[:3]))
        if not self.last:
            frames = encode(result.batch, [result.hidden])
            self.bytes_sent += frames_bytes(frames)
            await self.downstream.send_multipart(frames, copy=False)
            return
        records = result.records
        if batch.segments or batch.failed:
            feedback = Feedback(batch.batch_id, records)
            if self.first:
                self.scheduler.feedback(feedback)
                self.wake.set()
            else:
                frames = encode(feedback)
                self.bytes_sent += frames_bytes(frames)
                await self.to_first.send_multipart(frames, copy=False)
        if records:
            frames = encode(Tokens(self.pipeline.id, records, self.incarnation, self.version))
            self.broker_bytes_sent += frames_bytes(frames)
            await self.to_broker.send_multipart(frames, copy=False)

    async def release_idle(self) -> None:
        """Free the cache of requests nobody has run here for `idle_release_s` (every rank alike)."""
        idle = self.worker.idle_requests(self.spec.idle_release_s)
        if self.first:
            idle = [rid for rid in idle if rid not in self.scheduler.running]
        if idle:
            self.log.warning("freeing %d requests idle for %g s: %s", len(idle), self.spec.idle_release_s, idle[:5])
            model = self.worker.model
            empty = (torch.empty(0, dtype=torch.int64) if model.first
                     else torch.empty(0, model.info.hidden_size, dtype=model.dtype))
            await asyncio.get_running_loop().run_in_executor(self.executor, self._step,
                                                             MicroBatch(0, [], release=idle), empty)

    def heartbeat(self) -> Heartbeat:
        blocks = self.worker.blocks
        running = 0.0 if self.step_started is None else time.monotonic() - self.step_started
        return Heartbeat(self.spec.id, self.worker.capacity_tokens, len(blocks.request_ids()), blocks.used_blocks,
                         blocks.num_blocks, min(self.bad_messages, 2**31 - 1), running,
                         min(self.worker.failed_requests, 2**31 - 1), self.incarnation,
                         StageCounters(self.steps, self.step_seconds, self.step_tokens, self.step_requests,
                                       self.bytes_sent, self.broker_bytes_sent), self.version,
                         self.security.rejections() if self.security is not None else {})

    async def heartbeat_loop(self) -> None:
        """Liveness to the broker, never behind a step: nothing here waits for the compute thread."""
        while True:
            self.send_broker(self.heartbeat())
            if self.first:
                self.wake.set()  # lets the scheduler check deadlines
            await asyncio.sleep(HEARTBEAT_S)

    async def keepalive_loop(self) -> None:
        """Keep the followers' waits short while no step runs: a keep-alive through the compute thread when it
        has been idle (queued behind any step, so it never holds up the heartbeats), and idle requests freed."""
        loop = asyncio.get_running_loop()
        next_sweep = time.monotonic() + IDLE_SWEEP_S
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            if self.tp is not None:
                await loop.run_in_executor(self.executor, self._keepalive)
            if time.monotonic() > next_sweep:
                next_sweep = time.monotonic() + IDLE_SWEEP_S
                await self.release_idle()

    async def run(self) -> None:
        ready = StageReady(self.spec.id, 0, os.getpid(), self.worker.capacity_tokens, self.incarnation, self.version)
        self.send_broker(ready)
        if self.notify is not None:
            self.notify.send_multipart(encode(ready))
        self.log.info("ready: layers %s, %d KV tokens, listening on %s", self.spec.layers,
                      self.worker.capacity_tokens, self.spec.inbound)
        await run_until_first_failure(self.receive_loop(), self.compute_loop(), self.heartbeat_loop(),
                                      self.keepalive_loop())

    def fail(self, message: str) -> None:
        """Tell the broker (and the launcher) that this stage is gone."""
        failed = StageFailed(self.spec.id, message, incarnation=self.incarnation, version=self.version)
        for sock in (self.to_broker, self.notify):
            if sock is not None:
                try:
                    send_now(sock, encode(failed))
                except zmq.ZMQError:
                    pass

    def close(self) -> None:
        if self.tp is not None:
            try:
                self.tp.send(STOP)
            except Exception:
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.security is not None:
            self.security.stop()
        self.ctx.destroy(linger=200)


def follower_loop(worker: StageWorker, tp: TPGroup, log: logging.Logger) -> None:
    """Rank > 0: replay every step the leader broadcasts, until it says stop or goes silent. The worker fails
    requests exactly as the leader's does, so a bad request or a failed step leaves both serving."""
    while True:
        kind, batch, inputs = tp.receive()
        if kind == STOP:
            log.info("leader stopped")
            return
        if kind == KEEPALIVE:
            continue
        try:
            worker.check(batch, inputs)
        except BadBatch as exc:
            log.warning("rejected batch: %s", exc)
            continue
        worker.step(batch, inputs)


def build_worker(deployment: Deployment, stage_id: str, rank: int) -> tuple[StageWorker, TPGroup | None]:
    pipeline, index = deployment.stage(stage_id)
    spec = pipeline.stages[index]
    if not 0 <= rank < spec.tp:
        raise ValueError(f"stage {stage_id} has ranks 0..{spec.tp - 1}, not {rank}")
    device = torch.device(spec.ranks[rank].device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tp = TPGroup(spec.tp_init, rank, spec.tp, device, spec.tp_timeout_s, spec.start_timeout_s) if spec.tp > 1 else None
    info = deployment.model_info()
    model = StageModel(info, spec.layers, first=index == 0, last=index == len(pipeline.stages) - 1,
                       dtype=DTYPES[deployment.model.dtype], device=device, shard=ShardPlan.make(info, rank, spec.tp),
                       group=tp.group if tp else None)
    kernels.warm_up(model, spec.max_batch_tokens)  # oneDNN's kernels for every step size, before serving
    blocks = kv_blocks(spec, model)
    if tp is not None:  # every rank must manage the same pool: agree on the smallest
        blocks = tp.agree_min(blocks)
    return StageWorker(model, blocks, BLOCK_SIZE), tp


def run_stage(config: str, stage_id: str, rank: int = 0, notify: str | None = None, threads: int | None = None,
              keys: str | None = None, max_threads: int | None = None) -> int:
    """Entry of a stage process: load, handshake ready, serve until stopped; tell the parent on a crash."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{stage_id}:{rank}] %(levelname)s %(message)s")
    log = logging.getLogger(f"stage.{stage_id}")
    if threads:
        torch.set_num_threads(threads)
    leader = tp = worker = None
    try:
        deployment = load_deployment(config)
        pipeline, index = deployment.stage(stage_id)
        security = ProcessSecurity(deployment, pipeline.stages[index].ranks[0].host, keys) if rank == 0 else None
        worker, tp = build_worker(deployment, stage_id, rank)
        if worker.model.device.type == "cpu":  # a lone stage spreads over the cores the others leave idle
            worker.share_cores(CoreShare(torch.get_num_threads(), max_threads or machine_cores(), torch.set_num_threads))
        if rank > 0:
            follower_loop(worker, tp, log)
            return 0
        leader = StageLeader(deployment, stage_id, worker, tp, notify, Faults.from_env(stage_id), security)
        import uvloop

        uvloop.run(leader.run())
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        if isinstance(exc, (DeploymentError, KeyError, CheckpointError, SecurityError)):  # no traceback: say what
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
        if worker is not None and worker.cores is not None:
            worker.cores.close()
