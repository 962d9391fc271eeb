"""A host's supervisor (`hexgen-zmq up F [--host NAME]`): runs every process of the deployment file placed
on its host, restarts one that exits (back-off, crash-loop limit), follows the file when it is replaced
(stops what a new version removes or changes, starts what it adds), reports its processes to the broker
(`hexgen-zmq status` shows them), and stops everything on SIGTERM or Ctrl-C.

The decisions are `hexgen_zmq/operations/supervision.py`'s; this is the I/O around them: processes, the ready
handshake, the file, and two sockets to the broker (status queries, reports).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from hexgen_zmq.operations.deployment import Deployment, DeploymentError, file_version, load_deployment_text
from hexgen_zmq.operations.launcher import LaunchError, log_tail, spawn
from hexgen_zmq.wire.messages import (BrokerReady, HostReport, ProcessReport, StageFailed, StageReady, StatusReply,
                                 StatusRequest, WireError, decode_control, encode_control)
from hexgen_zmq.wire.security import ProcessSecurity
from hexgen_zmq.wire.sockets import CONTROL_MAX_BYTES, make_socket
from hexgen_zmq.operations.supervision import (FAILED, RUNNING, STOPPING, Change, RestartPolicy,
                                    Supervision, host_processes, plan_change)

log = logging.getLogger("supervisor")
WATCH_EVERY_S = 0.5  # how often the deployment file is compared with the version running
REPORT_EVERY_S = 1.0  # how often the broker hears how this host's processes are
RELEASE_WAIT_S = 10.0  # beyond the drain deadline: how long a retired pipeline's processes wait for the broker


class Supervisor:
    def __init__(self, config: str | Path, host: str | None = None, *, log_dir: str | Path | None = None,
                 threads: int | None = None, env: dict[str, str] | None = None,
                 policy: RestartPolicy | None = None, stop_grace_s: float = 10.0, keys: str | Path | None = None,
                 max_threads: int | None = None):
        self.config = Path(config)
        self.host = host
        self.log_dir = Path(log_dir) if log_dir else None
        self.threads, self.max_threads = threads, max_threads
        self.env = {**os.environ, **(env or {})}
        self.stop_grace_s = stop_grace_s
        self.file_digest, self.deployment = self._read()
        if isinstance(self.deployment, DeploymentError):
            raise self.deployment
        self.wanted = host_processes(self.deployment, host)
        if host is not None and not self.wanted:
            if self.deployment.host_named(self.deployment.canonical_host(host)) is None:
                known = ", ".join(h.name for h in self.deployment.hosts) or "none named"
                raise LaunchError(f"no process of {self.config} is placed on host {host!r} (hosts: {known})")
            # a host the file names but gives nothing to now: it waits for a redeploy that does
            log.info("nothing of %s is placed on host %s now; following the file", self.config, host)
        # Refuses a deployment off loopback without keys (secure by default), and checks this host's key;
        # the supervisor's own sockets (reports, status) are CURVE clients with it.
        self.keys = str(Path(keys).resolve()) if keys else None
        self.security = ProcessSecurity(self.deployment, host or self.deployment.broker_host(), self.keys)
        self.supervision = Supervision(policy)
        self.children: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path | None] = {}
        self.kill_at: dict[str, float] = {}  # processes sent SIGTERM: when SIGKILL follows
        self.retiring: dict[str, float] = {}  # processes of retired pipelines: stop once released, or at this time
        self.last_release_check = 0.0
        self.to_start: list[str] = []  # waiting for the processes they replace to stop
        self.config_error: str | None = None
        self.ctx = zmq.Context()
        self.notify = make_socket(self.ctx, zmq.PULL, bind="tcp://127.0.0.1:*", max_bytes=CONTROL_MAX_BYTES)
        self.notify_address = self.notify.getsockopt_string(zmq.LAST_ENDPOINT)
        self.reports = self.status_socket = None
        self.broker_endpoints: tuple[str, str] | None = None
        self.last_watch = self.last_report = 0.0
        now = time.monotonic()
        for spec in self.wanted.values():
            self.supervision.add(spec, now)

    # ---- the file ----

    def _read(self) -> tuple[str | None, Deployment | DeploymentError | None]:
        """The file's digest and what it holds (a Deployment or the error that refuses it); (None, None)
        while it cannot be read (in the middle of a swap, say)."""
        try:
            text = self.config.read_bytes()
        except OSError:
            return None, None
        digest = file_version(text)
        try:
            return digest, load_deployment_text(text, self.config)
        except DeploymentError as exc:
            return digest, exc

    def watch_file(self, now: float) -> None:
        """Adopt a replaced deployment file: refuse an invalid one (the running version keeps serving), or
        converge to a valid one."""
        if now - self.last_watch < WATCH_EVERY_S:
            return
        self.last_watch = now
        digest, deployment = self._read()
        if digest is None or digest == self.file_digest:
            return
        self.file_digest = digest
        if isinstance(deployment, DeploymentError):
            self.config_error = str(deployment)
            log.error("refused the new deployment file %s (the running version keeps serving): %s",
                      self.config, deployment)
            return
        self.config_error = None
        self.security.update(deployment)
        self.redeploy(deployment, now)

    def redeploy(self, deployment: Deployment, now: float) -> None:
        wanted = host_processes(deployment, self.host)
        running = {name: p.spec for name, p in self.supervision.processes.items() if p.state != STOPPING}
        running.update({name: self.wanted[name] for name in self.to_start if name in self.wanted})
        change: Change = plan_change(running, wanted)
        self.deployment, self.wanted = deployment, wanted
        if change.empty:
            log.info("deployment file changed; nothing changes on this host")
            return
        log.info("redeploy: stopping %s; starting %s", change.stop or "nothing", change.start or "nothing")
        self.to_start = [name for name in self.to_start if name in wanted and name not in change.start]
        finish = deployment.broker.redeploy == "finish"
        for name in change.stop:
            process = self.supervision.processes.get(name)
            if process is None:
                continue
            if process.pid is None:  # waiting for a restart, or failed: nothing to stop
                del self.supervision.processes[name]
            elif process.spec.pipeline is not None:
                # The broker moves (or lets finish) this pipeline's requests once it reads the new file;
                # the processes stop once it no longer counts on them.
                self.retiring[name] = now + RELEASE_WAIT_S + (deployment.broker.drain_timeout_s if finish else 0.0)
            else:
                self.stop_process(name, now)
        self.to_start += change.start

    # ---- processes ----

    def threads_per_rank(self) -> int:
        if self.threads:
            return self.threads
        ranks = sum(1 for spec in self.wanted.values() if spec.pipeline is not None)
        return max(1, (os.cpu_count() or 1) // max(ranks, 1))

    def start_process(self, name: str, now: float) -> None:
        spec = self.supervision.processes[name].spec
        args = list(spec.args)
        if spec.pipeline is not None:
            args += ["--threads", str(self.threads_per_rank())]
            if self.max_threads:
                args += ["--max-threads", str(self.max_threads)]
        if self.keys:
            args += ["--keys", self.keys]
        process, self.logs[name] = spawn(name, args, self.config, self.notify_address, self.log_dir, self.env)
        self.children[name] = process
        self.supervision.started(name, process.pid, now)

    def stop_process(self, name: str, now: float) -> None:
        self.supervision.stopping(name)
        self.retiring.pop(name, None)
        process = self.children.get(name)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            self.kill_at[name] = now + self.stop_grace_s

    def reap(self, now: float) -> None:
        for name, process in list(self.children.items()):
            status = process.poll()
            if status is None:
                if name in self.kill_at and now > self.kill_at[name]:
                    process.kill()
                continue
            del self.children[name]
            self.kill_at.pop(name, None)
            self.retiring.pop(name, None)
            state = self.supervision.exited(name, status, now)
            self.last_report = 0.0
            if state == FAILED:
                log.error("%s keeps exiting (status %s): given up after %d restarts%s", name, status,
                          self.supervision.processes[name].restarts, log_tail(self.logs.get(name)))
            elif state != STOPPING:
                log.warning("%s exited with status %s; restarting in %.1f s", name, status,
                            self.supervision.processes[name].next_start - now)

    def start_due(self, now: float) -> None:
        if self.to_start and not self.retiring and not self.kill_at:
            stopping = [n for n, p in self.supervision.processes.items() if p.state == STOPPING]
            if not stopping:  # what the new processes replace is gone: their ports and devices are free
                for name in self.to_start:
                    self.supervision.add(self.wanted[name], now)
                self.to_start = []
        for name in self.supervision.due(now):
            self.start_process(name, now)

    def read_notifications(self) -> None:
        while self.notify.poll(0):
            try:
                message = decode_control(self.notify.recv_multipart())
            except WireError:
                continue
            self.last_report = 0.0  # news: the broker hears it with the next step, not within the second
            if isinstance(message, BrokerReady):
                self.supervision.ready("broker")
            elif isinstance(message, StageReady):
                for name in self.supervision.processes:
                    if name.rpartition(":")[0] == message.stage_id:
                        self.supervision.ready(name)
            elif isinstance(message, StageFailed) and not message.request_ids:
                log.error("stage %s failed: %s", message.stage_id, message.message)

    # ---- the broker ----

    def _broker_sockets(self) -> None:
        endpoints = (self.deployment.broker.clients, self.deployment.broker.results)
        if endpoints == self.broker_endpoints:
            return
        for sock in (self.reports, self.status_socket):
            if sock is not None:
                sock.close(linger=0)
        self.reports = make_socket(self.ctx, zmq.PUSH, connect=endpoints[1], hwm=4, max_bytes=CONTROL_MAX_BYTES,
                                   security=self.security)
        self.status_socket = None
        self.broker_endpoints = endpoints

    def broker_status(self, timeout_s: float = 1.0) -> StatusReply | None:
        """Ask the broker how it stands; None when it does not answer (stopped, or unreachable)."""
        self._broker_sockets()
        if self.status_socket is None:
            self.status_socket = make_socket(self.ctx, zmq.DEALER, connect=self.deployment.broker.clients,
                                             max_bytes=8 << 20, security=self.security)
        nonce = int.from_bytes(os.urandom(6), "big")
        self.status_socket.send_multipart(encode_control(StatusRequest(nonce)), zmq.NOBLOCK)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.status_socket.poll(int(left * 1000) + 1):
                break
            try:
                reply = decode_control(self.status_socket.recv_multipart())
            except WireError:
                continue
            if isinstance(reply, StatusReply) and reply.nonce == nonce:
                return reply
        self.status_socket.close(linger=0)  # a late reply must not be read as the next one's
        self.status_socket = None
        return None

    def release_retired(self, now: float) -> None:
        """Stop a retired pipeline's processes once the broker has let go of it (it no longer lists that
        version of the pipeline), at their deadline, or at once when the broker does not answer."""
        if not self.retiring or now - self.last_release_check < WATCH_EVERY_S:
            return
        self.last_release_check = now
        status = self.broker_status()
        held = set() if status is None else {(p.id, p.version) for p in status.pipelines}
        for name, deadline in list(self.retiring.items()):
            spec = self.supervision.processes[name].spec
            if (spec.pipeline, spec.version) not in held or now > deadline:
                self.stop_process(name, now)

    def report(self, now: float) -> None:
        if now - self.last_report < REPORT_EVERY_S:
            return
        self.last_report = now
        self._broker_sockets()
        processes = [ProcessReport(name, p.state, p.pid or 0, p.restarts, p.last_exit, p.spec.version)
                     for name, p in sorted(self.supervision.processes.items())]
        report = HostReport(self.host or "(all)", os.getpid(), processes, self.file_digest or "", self.config_error)
        try:
            self.reports.send_multipart(encode_control(report), zmq.NOBLOCK)
        except zmq.Again:
            pass

    # ---- the loop ----

    def step(self) -> None:
        now = time.monotonic()
        self.reap(now)
        self.read_notifications()
        self.watch_file(now)
        self.release_retired(now)
        self.start_due(now)
        self.report(now)

    def failed(self) -> list[str]:
        return [name for name, p in self.supervision.processes.items() if p.state == FAILED]

    def wait_ready(self, timeout_s: float, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Start this host's processes and return once each has said it is ready (and, with the broker here
        and every stage too, once the broker has heard from every pipeline). LaunchError when a process
        is given up on, reports a failure to start, time runs out or `stop_requested()`."""
        deadline = time.monotonic() + timeout_s
        everything = len(self.wanted) == len(host_processes(self.deployment, None))
        while True:
            self.step()
            if stop_requested():
                raise LaunchError("stopped during start-up")
            if failed := self.failed():
                raise LaunchError(f"{failed[0]} keeps exiting{log_tail(self.logs.get(failed[0]))}")
            states = {name: p.state for name, p in self.supervision.processes.items()}
            if all(state == RUNNING for state in states.values()):
                if not everything or self.broker_serves():
                    return
            if time.monotonic() > deadline:
                waiting = sorted(n for n, s in states.items() if s != RUNNING)
                raise LaunchError(f"not ready after {timeout_s:g} s: {', '.join(waiting) or 'the broker'}")
            time.sleep(0.05)

    def broker_serves(self) -> bool:
        status = self.broker_status(0.5)
        return status is not None and all(p.ready and p.healthy for p in status.pipelines)

    def run(self, stop_requested: Callable[[], bool]) -> None:
        while not stop_requested():
            self.step()
            time.sleep(0.1)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every child, then SIGKILL what still runs after the grace period."""
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        for process in self.children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.children.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self.children.clear()
        if not self.ctx.closed:
            for sock in (self.notify, self.reports, self.status_socket):
                if sock is not None:
                    sock.close(linger=0)
            self.ctx.term()
