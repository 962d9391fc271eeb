"""The broker: `hexgen-zmq broker --config F`, the front door of a deployment.

Clients talk to its ROUTER; stages report to its results PULL; it pushes Submit / Cancel to each pipeline's
first stage. Every decision (admission by KV budget, dispatch to the pipeline where a request would get its
tokens soonest, deadlines, cancellation, heartbeats and incarnations, the progress watchdog, replay of a
failed pipeline's requests) is `hexgen_zmq.serving.broker_state.BrokerState`; this process is its I/O shell: it
decodes what arrives, hands it to the state machine, sends what the machine put in its outbox, holds events
for clients that cannot take them yet, and tokenizes text prompts on a thread of their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import zmq
import zmq.asyncio

from hexgen_zmq.operations.aio import run_until_first_failure
from hexgen_zmq.serving.broker_state import BrokerState, PipelineState, ToClient
from hexgen_zmq.operations.deployment import Deployment, DeploymentError, file_version, load_deployment_text
from hexgen_zmq.wire.messages import BrokerReady, GenerateRequest, WireError, decode_control, encode_control
from hexgen_zmq.wire.security import BROKER_CLIENTS, BROKER_RESULTS, ProcessSecurity, SecurityError
from hexgen_zmq.wire.sockets import CONTROL_MAX_BYTES, make_socket, send_now

log = logging.getLogger("broker")
TICK_S = 0.05
WATCH_S = 0.5  # how often the deployment file is compared with the version adopted
BACKLOG_LIMIT = 10_000  # events held for a client that cannot take them now, before it counts as gone


class Broker(BrokerState):
    def __init__(self, deployment: Deployment, notify: str | None = None, config: str | Path | None = None,
                 text: bytes = b"", keys: str | None = None):
        super().__init__(deployment, deployment.model_info())
        self.security = ProcessSecurity(deployment, deployment.broker_host(), keys)
        self.config_path = Path(config) if config else None  # watched: a new version is adopted (redeploy)
        self.file_version = file_version(text) if text else ""
        self.refused_version = ""
        self.ctx = zmq.asyncio.Context()
        self.security.start(self.ctx)
        self.clients = make_socket(self.ctx, zmq.ROUTER, bind=self.config.clients, hwm=10000,
                                   max_bytes=CONTROL_MAX_BYTES, security=self.security, domain=BROKER_CLIENTS)
        self.clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an event for a client not connected now is held, not lost
        self.results = make_socket(self.ctx, zmq.PULL, bind=self.config.results, hwm=10000,
                                   max_bytes=CONTROL_MAX_BYTES, security=self.security, domain=BROKER_RESULTS)
        self.sockets: dict[str, zmq.asyncio.Socket] = {}  # to each pipeline's first stage, by its key
        self.sync_routes({})
        self.notify = make_socket(self.ctx, zmq.PUSH, connect=notify, max_bytes=CONTROL_MAX_BYTES) if notify else None
        self.backlog: dict[bytes, deque] = {}  # per client: events it could not take yet, in order
        self.backlog_since: dict[bytes, float] = {}  # when each backlog last moved
        self.dropped_sends = 0
        self.tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self.tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ tokenizer
    def load_tokenizer(self) -> None:
        """Load the checkpoint's tokenizer, if it has one, before serving (text prompts, chat, output text)."""
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.info.path, trust_remote_code=False)
            # A second instance for the tokenizing thread: a Rust tokenizer in use by one thread refuses
            # another ("Already borrowed"), and the loop decodes finished requests' text meanwhile.
            self.encoder = AutoTokenizer.from_pretrained(self.info.path, trust_remote_code=False)
            self.max_token_chars = max((len(token) for token in self.tokenizer.get_vocab()), default=0)
        except Exception as exc:  # token-id requests still work
            log.warning("no usable tokenizer in %s (%s): only prompt_ids requests are served", self.info.path, exc)

    def start_tokenizing(self, client: bytes, message: GenerateRequest, timeout: float) -> None:
        """Tokenizing a long text or applying a chat template takes long enough to hold up heartbeats and
        tokens of every other request: it runs on its own thread, one at a time, and the loop goes on."""
        async def tokenize() -> None:
            encoded = await asyncio.get_running_loop().run_in_executor(self.tokenizer_pool, self.encode_prompt, message)
            self.tokenized(client, message, timeout, *encoded)
            self.send_outbox()

        task = asyncio.create_task(tokenize())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ------------------------------------------------------------------ redeploys
    def sync_routes(self, renamed: dict[str, str]) -> None:
        """One PUSH socket per pipeline (current or retiring) to its first stage; a retired pipeline's
        socket moves with it to its new key and closes once it is gone."""
        for old, new in renamed.items():
            if old in self.sockets:
                self.sockets[new] = self.sockets.pop(old)
        routes = self.routes()
        for key in [k for k in self.sockets if k not in routes]:
            self.sockets.pop(key).close(linger=500)  # its last Cancels still go out
        for key, endpoint in routes.items():
            if key not in self.sockets:
                self.sockets[key] = make_socket(self.ctx, zmq.PUSH, connect=endpoint, max_bytes=CONTROL_MAX_BYTES,
                                                security=self.security)

    def check_file(self) -> None:
        """Adopt a new version of the deployment file, or refuse an invalid one (logged, and in `status`):
        the running version keeps serving."""
        try:
            text = self.config_path.read_bytes()
        except OSError:  # in the middle of a swap: look again next time
            return
        version = file_version(text)
        if version in (self.file_version, self.refused_version):
            return
        try:
            deployment = load_deployment_text(text, self.config_path)
        except DeploymentError as exc:
            self.refused_version = version
            log.error("refused the new deployment file (the running version keeps serving): %s", exc)
            return self.refuse_file(str(exc))
        if (deployment.broker.clients, deployment.broker.results) != (self.config.clients, self.config.results):
            log.warning("the new deployment file moves the broker; this one serves until its supervisor replaces it")
        log.info("adopting deployment file version %s", version)
        self.security.update(deployment)  # its keys count for new connections from now on
        self.sync_routes(self.redeploy(deployment, version))

    def rejected_peers(self) -> dict[str, int]:
        return self.security.rejections()

    async def watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                self.check_file()
            except Exception:
                log.exception("following the deployment file failed")
            self.sync_routes({})
            self.send_outbox()

    # ------------------------------------------------------------------ sending
    def send_outbox(self) -> None:
        outbox, self.outbox = self.outbox, []
        for item in outbox:
            if isinstance(item, ToClient):
                self.send_client(item.client, item.message)
            elif item.pipeline not in self.sockets:
                continue  # a retired pipeline's, gone meanwhile
            elif not send_now(self.sockets[item.pipeline], encode_control(item.message)):
                # the stage is down and its queue full: a lost Submit is caught by the progress watchdog,
                # a lost Cancel by the stage's own deadline and idle release
                self.dropped_sends += 1

    def send_client(self, client: bytes, message) -> None:
        """Send, or hold it for the client when it cannot take it now (its queue is full, or it is
        reconnecting): no event, least of all a request's last, is dropped while the client lives."""
        backlog = self.backlog.get(client)
        if backlog:
            backlog.append(message)
        elif not self._send_client(client, message):
            self.backlog[client] = deque([message])
            self.backlog_since[client] = time.monotonic()

    def _send_client(self, client: bytes, message) -> bool:
        return send_now(self.clients, [client, *encode_control(message)])  # False: queue full, or not connected

    def flush_backlogs(self, now: float) -> None:
        for client, backlog in list(self.backlog.items()):
            while backlog and self._send_client(client, backlog[0]):
                backlog.popleft()
                self.backlog_since[client] = now
            if not backlog:
                del self.backlog[client], self.backlog_since[client]
            elif len(backlog) > BACKLOG_LIMIT or now - self.backlog_since[client] > 3 * self.config.client_timeout_s:
                log.warning("a client took no events for a while (%d held): taken to be gone", len(backlog))
                del self.backlog[client], self.backlog_since[client]
                self.drop_client(client, notify=False)

    # ------------------------------------------------------------------ loops
    async def client_loop(self) -> None:
        while True:
            frames = await self.clients.recv_multipart(copy=False)
            try:
                message = decode_control(frames[1:])
                if self.security.admits(BROKER_CLIENTS, frames[-1], type(message).__name__):
                    self.on_client_message(frames[0].bytes, message)
            except WireError as exc:
                self.reject(str(exc))
            except Exception:
                log.exception("handling a client message failed")
                self.bad_messages += 1
            self.send_outbox()

    async def results_loop(self) -> None:
        while True:
            frames = await self.results.recv_multipart(copy=False)
            try:
                message = decode_control(frames)
                if self.security.admits(BROKER_RESULTS, frames[0], type(message).__name__) and \
                        self.security.sent_by_its_host(frames[0], message):
                    self.on_stage_message(message)
            except WireError as exc:
                self.reject(str(exc))
            except Exception:
                log.exception("handling a result failed")
                self.bad_messages += 1
            self.send_outbox()

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.flush_backlogs(time.monotonic())
                self.tick()
            except Exception:
                log.exception("broker tick failed")
            self.send_outbox()

    async def run(self) -> None:
        self.load_tokenizer()
        if self.info.ignored_generation_settings:
            log.warning("generation_config.json sets %s, which requests here do not apply",
                        ", ".join(self.info.ignored_generation_settings))
        self.announce()  # first stages drop what an earlier incarnation left running
        self.send_outbox()
        if self.notify is not None:
            self.notify.send_multipart(encode_control(BrokerReady(os.getpid())))
        log.info("broker ready: clients at %s, results at %s", self.config.clients, self.config.results)
        try:
            loops = [self.client_loop(), self.results_loop(), self.tick_loop()]
            if self.config_path is not None:
                loops.append(self.watch_loop())
            await run_until_first_failure(*loops)
        finally:
            self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)
            self.security.stop()
            self.ctx.destroy(linger=200)


def run_broker(config: str, notify: str | None = None, keys: str | None = None) -> int:
    """Entry of the broker process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [broker] %(levelname)s %(message)s")
    import uvloop

    try:
        text = Path(config).read_bytes()
        uvloop.run(Broker(load_deployment_text(text, Path(config)), notify, config, text, keys).run())
    except OSError as exc:
        log.error("cannot read %s: %s", config, exc.strerror)
        return 1
    except KeyboardInterrupt:
        pass
    except (DeploymentError, SecurityError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


__all__ = ["Broker", "PipelineState", "run_broker"]
