"""Continuous batching on a pipeline's first stage (pure policy, no torch).

The first stage owns the decode loop: it forms every micro-batch from the work that is ready (decode steps
of running requests whose last token came back, prompt chunks of new ones), within a per-step token budget,
and keeps up to `depth` micro-batches in flight so that every stage of the pipeline has one to work on.
Requests join and leave between steps. A request is admitted into the KV cache only when the pipeline's
budget can hold its whole life (prompt + max_new_tokens); the others wait in FIFO order.

How finely the running requests are split is `micro_batches`: with stages on their own devices, one
micro-batch per stage keeps them all busy; with stages sharing a host's cores, fewer and larger
micro-batches read the weights fewer times per token. While micro-batches are in flight, a new one is
formed only once it would hold its share (`running / micro_batches`), so split batches merge again.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from hexgen_zmq.stage.block_manager import blocks_for
from hexgen_zmq.wire.messages import Cancel, Feedback, MicroBatch, NewRequest, Segment, Submit


@dataclass
class Request:
    submit: Submit
    total_tokens: int
    deadline: float | None
    computed: int = 0  # positions already sent through this stage
    next_token: int | None = None  # the sampled token waiting to be fed back in
    in_flight: bool = False  # a sampled segment is on its way through the pipeline
    announced: bool = False

    @property
    def id(self) -> int:
        return self.submit.request_id

    @property
    def prompt_left(self) -> int:
        return len(self.submit.prompt) - self.computed


class Scheduler:
    def __init__(self, capacity_blocks: int, block_size: int, max_batch_tokens: int, depth: int,
                 micro_batches: int | None = None, clock=time.monotonic, max_waiting: int = 4096):
        self.own_capacity_blocks = self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.depth = max(1, depth)  # micro-batches in flight at most
        self.micro_batches = max(1, min(micro_batches or self.depth, self.depth))
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.waiting_ids: set[int] = set()
        self.max_waiting = max_waiting
        self.running: dict[int, Request] = {}
        self.reserved_blocks = 0
        self.pending_release: list[int] = []
        # micro-batches on their way through the pipeline -> the requests in them that are still alive
        self.in_flight: dict[int, set[int]] = {}
        # ... and of those, the ones whose sampled token (or failure) has not come back yet
        self.awaiting: dict[int, set[int]] = {}
        self._next_batch_id = 0

    # ------------------------------------------------------------------ events
    def submit(self, submit: Submit) -> bool:
        """Queue a new request. False when it is a duplicate, or when `max_waiting` requests already wait
        (the broker bounds what it sends; this bounds what anyone else could)."""
        if submit.request_id in self.running or submit.request_id in self.waiting_ids:
            return False  # a duplicate delivery
        if len(self.waiting) >= self.max_waiting:
            return False
        if submit.kv_budget_blocks:  # the broker's view of the smallest cache in the pipeline
            self.capacity_blocks = min(self.own_capacity_blocks, submit.kv_budget_blocks)
        total = len(submit.prompt) + submit.params.max_new_tokens
        deadline = None if submit.timeout_s is None else self.clock() + submit.timeout_s
        self.waiting.append(Request(submit, total, deadline))
        self.waiting_ids.add(submit.request_id)
        return True

    def requests_of_other_brokers(self, broker: int) -> list[int]:
        """Requests submitted by a broker incarnation other than `broker` (orphans once `broker` took over)."""
        return [r.id for r in (*self.waiting, *self.running.values()) if r.submit.broker != broker]

    def cancel(self, cancel: Cancel) -> list[int]:
        """Drop requests wherever they are; returns the ids that were known."""
        dropped = []
        ids = set(cancel.request_ids)
        if ids & self.waiting_ids:
            for request in [r for r in self.waiting if r.id in ids]:
                self.waiting.remove(request)
                self.waiting_ids.discard(request.id)
                dropped.append(request.id)
        for request_id in ids & self.running.keys():
            self._finish(request_id)
            dropped.append(request_id)
        # Ids this stage does not know may still hold cache further down (this stage restarted, say): the
        # release costs nothing where they are unknown too.
        self.pending_release.extend(sorted(ids - set(dropped) - set(self.pending_release)))
        for batch_id, alive in list(self.in_flight.items()):
            alive -= ids
            self.awaiting[batch_id] -= ids
            if not alive:  # nothing in it is awaited any more (e.g. a stage rejected it): free the slot
                del self.in_flight[batch_id], self.awaiting[batch_id]
        return dropped

    def feedback(self, feedback: Feedback) -> bool:
        """Tokens sampled for one micro-batch came back: feed them in, retire finished requests. Only records
        of requests in that batch count, and the batch is done once each of its sampled requests has its
        token or failure, so a stray or forged feedback that reuses its id cannot strand its requests.
        False (and nothing changes) for a batch that is not in flight."""
        if feedback.batch_id not in self.in_flight:
            return False
        members, awaiting = self.in_flight[feedback.batch_id], self.awaiting[feedback.batch_id]
        for record in feedback.records:
            if record.request_id not in members:
                continue
            members.discard(record.request_id)
            awaiting.discard(record.request_id)
            request = self.running.get(record.request_id)
            if request is None:
                continue  # cancelled while in flight
            request.in_flight = False
            if record.finished or record.token < 0:
                self._finish(record.request_id)
            else:
                request.next_token = record.token
        if not awaiting:
            del self.in_flight[feedback.batch_id], self.awaiting[feedback.batch_id]
        return True

    def expire(self) -> list[int]:
        """Drop requests past their deadline (a guard in case the broker's cancel never comes)."""
        now = self.clock()
        late = [r.id for r in (*self.waiting, *self.running.values()) if r.deadline is not None and now > r.deadline]
        if late:
            self.cancel(Cancel(late, "deadline"))
        return late

    def _finish(self, request_id: int) -> None:
        request = self.running.pop(request_id)
        self.reserved_blocks -= blocks_for(request.total_tokens, self.block_size)
        # The last stage frees finished requests itself; the release frees every stage before it.
        self.pending_release.append(request_id)

    # ------------------------------------------------------------------ batching
    def _admit_waiting(self) -> None:
        while self.waiting:
            need = blocks_for(self.waiting[0].total_tokens, self.block_size)
            if self.reserved_blocks + need > self.capacity_blocks:
                break
            request = self.waiting.popleft()
            self.waiting_ids.discard(request.id)
            self.reserved_blocks += need
            self.running[request.id] = request

    def next_batch(self) -> tuple[MicroBatch, list[int]] | None:
        """The next micro-batch and its token ids, or None when nothing is ready or the pipeline is full."""
        if len(self.in_flight) >= self.depth:
            return None
        self._admit_waiting()
        cap = max(1, math.ceil(len(self.running) / self.micro_batches))
        if self.in_flight and not self.pending_release:
            ready = sum(1 for r in self.running.values() if not r.in_flight and (r.next_token is not None or r.prompt_left > 0))
            if ready < cap:
                return None  # wait for more of this batch's share to come back
        budget = self.max_batch_tokens
        segments: list[Segment] = []
        new: list[NewRequest] = []
        tokens: list[int] = []
        for request in self.running.values():  # decode steps first: they hold the latency
            if len(segments) >= cap or budget < 1:
                break
            if request.next_token is None or request.in_flight:
                continue
            segments.append(Segment(request.id, request.computed, 1, True))
            tokens.append(request.next_token)
            request.computed += 1
            request.next_token = None
            request.in_flight = True
            budget -= 1
        for request in self.running.values():  # then prompt chunks, oldest first
            if len(segments) >= cap or budget < 1:
                break
            if request.prompt_left <= 0:
                continue
            n = min(request.prompt_left, budget)
            last_chunk = n == request.prompt_left
            segments.append(Segment(request.id, request.computed, n, last_chunk))
            tokens.extend(request.submit.prompt[request.computed : request.computed + n])
            if not request.announced:
                sub = request.submit
                new.append(NewRequest(sub.request_id, request.total_tokens, sub.params, sub.eos_token_ids,
                                      sub.generated))
                request.announced = True
            request.computed += n
            request.in_flight = last_chunk
            budget -= n
        if not segments and not self.pending_release:
            return None
        batch = MicroBatch(self._next_batch_id, segments, new, self.pending_release)
        self._next_batch_id += 1
        self.pending_release = []
        if segments:
            self.in_flight[batch.batch_id] = {seg.request_id for seg in segments}
            self.awaiting[batch.batch_id] = {seg.request_id for seg in segments if seg.sample}
        return batch, tokens
