"""Local deployment: start the broker and every rank of every stage of a deployment file on this machine as
separate processes, wait for each to report ready (a handshake, not a sleep), watch them, stop them all.

Used by `hexgen-zmq up`, the demo and the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq

from hexgen_zmq.operations.deployment import Deployment, load_deployment
from hexgen_zmq.operations.parent_death import child_env
from hexgen_zmq.wire.messages import (BrokerReady, StageFailed, StageReady, StatusReply, StatusRequest, WireError,
                                 decode_control, encode_control)
from hexgen_zmq.wire.sockets import CONTROL_MAX_BYTES, make_socket


class LaunchError(RuntimeError):
    """A process of the deployment failed to start or died."""


@dataclass
class Child:
    name: str  # "broker" or "STAGE:RANK"
    process: subprocess.Popen
    log_path: Path | None
    args: list[str]


def spawn(name: str, args: list[str], config: Path, notify: str | None, log_dir: Path | None,
          env: dict[str, str]) -> tuple[subprocess.Popen, Path | None]:
    """Start one process of a deployment (`hexgen-zmq ARGS --config F`) in a session of its own, its output
    appended to LOG_DIR/NAME.log when a log folder is given; it ends when this process does (parent_death)."""
    cmd = [sys.executable, "-m", "hexgen_zmq.cli", *args, "--config", str(config)]
    if notify is not None:
        cmd += ["--notify", notify]
    log_path = None
    out = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{name.replace(':', '-')}.log"
        out = open(log_path, "ab")
    try:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                   env=child_env(env), start_new_session=True)
    finally:
        if out is not None:
            out.close()
    return process, log_path


def log_tail(log_path: Path | None, lines: int = 15) -> str:
    """The end of a process's log, to show with the news that it died."""
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    return f" (log {log_path}):\n" + "\n".join(tail)


class LocalDeployment:
    def __init__(self, config: str | Path, *, log_dir: str | Path | None = None, threads: int | None = None,
                 env: dict[str, str] | None = None, start_timeout_s: float = 180.0, max_threads: int | None = None):
        self.config = Path(config)
        self.start_timeout_s = start_timeout_s  # what `with LocalDeployment(...)` waits for readiness
        self.deployment: Deployment = load_deployment(self.config)
        self.log_dir = Path(log_dir) if log_dir else None
        ranks = sum(s.tp for p in self.deployment.pipelines for s in p.stages)
        self.threads = threads or max(1, (os.cpu_count() or 1) // ranks)
        self.max_threads = max_threads  # None: a stage computing alone may use every core
        self.env = {**os.environ, **(env or {})}
        self.children: list[Child] = []

    @property
    def address(self) -> str:
        return self.deployment.broker.clients

    def _spawn(self, name: str, args: list[str], notify: str | None) -> Child:
        process, log_path = spawn(name, args, self.config, notify, self.log_dir, self.env)
        child = Child(name, process, log_path, args)
        self.children.append(child)
        return child

    def restart(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one process (SIGKILL by default) and start it again with the same arguments, without waiting
        for it to be ready: how a host restarts a crashed process (tests of faults use it)."""
        child = next(c for c in self.children if c.name == name)
        if child.process.poll() is None:
            child.process.send_signal(sig)
            child.process.wait(10)
        self.children.remove(child)
        self._spawn(name, child.args, None)

    def start(self, timeout_s: float = 180.0, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Start everything and return once the broker and every stage leader said ready. A LaunchError
        (with everything started so far stopped) when a process fails, time runs out or `stop_requested()`."""
        ctx = zmq.Context()
        notify = make_socket(ctx, zmq.PULL, bind="tcp://127.0.0.1:*", max_bytes=CONTROL_MAX_BYTES)
        address = notify.getsockopt_string(zmq.LAST_ENDPOINT)
        try:
            self._spawn("broker", ["broker"], address)
            waiting = {"broker"}
            for pipeline in self.deployment.pipelines:
                for stage in pipeline.stages:
                    for rank in range(stage.tp):
                        self._spawn(f"{stage.id}:{rank}", ["stage", "--stage", stage.id, "--rank", str(rank),
                                                          "--threads", str(self.threads),
                                                          *(["--max-threads", str(self.max_threads)]
                                                            if self.max_threads else [])], address)
                    waiting.add(stage.id)
            deadline = time.monotonic() + timeout_s
            while waiting:
                self._check_starting(deadline, stop_requested, f"not ready after {timeout_s:g} s: "
                                                               f"{', '.join(sorted(waiting))}")
                if not notify.poll(200):
                    continue
                try:
                    message = decode_control(notify.recv_multipart())
                except WireError:
                    continue
                if isinstance(message, BrokerReady):
                    waiting.discard("broker")
                elif isinstance(message, StageReady):
                    waiting.discard(message.stage_id)
                elif isinstance(message, StageFailed):
                    raise LaunchError(f"stage {message.stage_id} failed to start: {message.message}")
            self._wait_until_broker_serves(ctx, deadline, stop_requested)
        except BaseException:
            self.stop()
            raise
        finally:
            notify.close(linger=0)
            ctx.term()

    def _wait_until_broker_serves(self, ctx: zmq.Context, deadline: float, stop_requested: Callable[[], bool]) -> None:
        """Every process said ready to us; wait until the broker has heard from every stage too, so that a
        client connecting the moment start() returns is served, not told that no pipeline is ready."""
        sock = make_socket(ctx, zmq.DEALER, connect=self.address, max_bytes=CONTROL_MAX_BYTES)
        try:
            while True:
                self._check_starting(deadline, stop_requested, "the broker did not see every pipeline ready in time")
                sock.send_multipart(encode_control(StatusRequest()))
                if sock.poll(200):
                    try:
                        reply = decode_control(sock.recv_multipart())
                    except WireError:
                        continue
                    if isinstance(reply, StatusReply) and all(p.ready and p.healthy for p in reply.pipelines):
                        return
                time.sleep(0.05)
        finally:
            sock.close(linger=0)

    def _check_starting(self, deadline: float, stop_requested: Callable[[], bool], late: str) -> None:
        """Raise LaunchError when start-up must end: asked to stop, past the deadline (`late` says what is
        missing), or a process died."""
        if stop_requested():
            raise LaunchError("stopped during start-up")
        if time.monotonic() > deadline:
            raise LaunchError(late)
        if dead := self.dead():
            raise LaunchError(f"{dead} exited during start-up{self._log_hint(dead)}")

    def _log_hint(self, name: str) -> str:
        child = next((c for c in self.children if c.name == name), None)
        return log_tail(child.log_path if child else None)

    def dead(self) -> str | None:
        """The name of a process that has exited, if any."""
        for child in self.children:
            if child.process.poll() is not None:
                return child.name
        return None

    def pid(self, name: str) -> int:
        return next(c.process.pid for c in self.children if c.name == name)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM everything, then SIGKILL what is still running after `grace_s`."""
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)
        self.children.clear()

    def __enter__(self) -> LocalDeployment:
        self.start(self.start_timeout_s)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
