"""What a host's supervisor decides, as plain Python: which processes of a deployment file run on a host,
which to stop and start when the file changes, and when a process that exited is started again.

No processes and no sockets here: the supervisor process (`hexgen_zmq/operations/supervisor.py`) is the I/O shell
that spawns, polls and signals, and feeds this what it sees.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hexgen_zmq.operations.deployment import Deployment


@dataclass(frozen=True)
class ProcessSpec:
    """One process of a deployment: `name` is "broker" or "STAGE:RANK"; `version` changes whenever what the
    process is made of changes (a redeploy then replaces it); `pipeline` is the stage's pipeline id."""

    name: str
    args: tuple[str, ...]
    version: str
    pipeline: str | None = None


def on_host(deployment: Deployment, host: str | None, placed: str) -> bool:
    """Whether a process placed on `placed` (a host name or a bare address) runs under the supervisor of
    `host` (None: the all-in-one supervisor, which runs everything)."""
    if host is None:
        return True
    return deployment.canonical_host(placed) == deployment.canonical_host(host)


def host_processes(deployment: Deployment, host: str | None) -> dict[str, ProcessSpec]:
    """Every process of the deployment that runs on `host` (all of them for None), by name."""
    wanted: dict[str, ProcessSpec] = {}
    if on_host(deployment, host, deployment.broker_host()):
        broker = deployment.broker
        wanted["broker"] = ProcessSpec("broker", ("broker",), f"{broker.clients} {broker.results}")
    for pipeline in deployment.pipelines:
        version = deployment.pipeline_version(pipeline)
        for stage in pipeline.stages:
            for rank, spec in enumerate(stage.ranks):
                if on_host(deployment, host, spec.host):
                    name = f"{stage.id}:{rank}"
                    wanted[name] = ProcessSpec(name, ("stage", "--stage", stage.id, "--rank", str(rank)), version,
                                               pipeline.id)
    return wanted


@dataclass(frozen=True)
class Change:
    """How to go from the processes that run to those a new file wants: stop first (new stages may need
    the ports and devices of old ones), then start."""

    stop: list[str]
    start: list[str]

    @property
    def empty(self) -> bool:
        return not self.stop and not self.start


def plan_change(running: dict[str, ProcessSpec], wanted: dict[str, ProcessSpec]) -> Change:
    """Processes whose spec is unchanged keep running; removed or changed ones stop; new or changed ones start."""
    stop = [name for name, spec in running.items() if wanted.get(name) != spec]
    start = [name for name, spec in wanted.items() if running.get(name) != spec]
    return Change(stop, start)


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential back-off between restarts of a process that keeps exiting, and a crash-loop limit after
    which it is reported failed instead of spinning. A process that ran `stable_s` counts as healthy again
    (its back-off starts over)."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    crash_loop_exits: int = 5  # exits within crash_loop_window_s that make it failed
    crash_loop_window_s: float = 120.0
    stable_s: float = 60.0


STARTING, RUNNING, BACKOFF, FAILED, STOPPING = "starting", "running", "backoff", "failed", "stopping"


@dataclass
class Supervised:
    spec: ProcessSpec
    state: str = BACKOFF  # not started yet: due at next_start
    pid: int | None = None
    restarts: int = 0
    last_exit: int | None = None  # exit status (negative: killed by that signal)
    started_at: float = 0.0
    next_start: float = 0.0
    exits: deque[float] = field(default_factory=deque)  # recent unexpected exits


class Supervision:
    """The processes of one host and their lifecycle: started, ready (running), exited and waiting to be
    started again (backoff), given up on (failed), being stopped (stopping)."""

    def __init__(self, policy: RestartPolicy | None = None):
        self.policy = policy or RestartPolicy()
        self.processes: dict[str, Supervised] = {}

    def add(self, spec: ProcessSpec, now: float) -> None:
        self.processes[spec.name] = Supervised(spec, next_start=now)

    def due(self, now: float) -> list[str]:
        """Processes to start now: new ones, and those whose back-off has passed."""
        return [name for name, p in self.processes.items() if p.state == BACKOFF and p.next_start <= now]

    def started(self, name: str, pid: int, now: float) -> None:
        process = self.processes[name]
        process.state, process.pid, process.started_at = STARTING, pid, now

    def ready(self, name: str) -> None:
        process = self.processes.get(name)
        if process is not None and process.state == STARTING:
            process.state = RUNNING

    def stopping(self, name: str) -> None:
        self.processes[name].state = STOPPING

    def exited(self, name: str, status: int, now: float) -> str:
        """A process exited: forget it if it was being stopped, else schedule its restart after a back-off
        that doubles with each recent exit, or give up on it after `crash_loop_exits` within the window.
        Returns its new state."""
        process = self.processes[name]
        process.last_exit, process.pid = status, None
        if process.state == STOPPING:
            del self.processes[name]
            return STOPPING
        policy = self.policy
        if now - process.started_at >= policy.stable_s:
            process.exits.clear()
        process.exits.append(now)
        while process.exits and now - process.exits[0] > policy.crash_loop_window_s:
            process.exits.popleft()
        if len(process.exits) >= policy.crash_loop_exits:
            process.state = FAILED
            return FAILED
        backoff = min(policy.max_backoff_s, policy.initial_backoff_s * 2 ** (len(process.exits) - 1))
        process.state, process.next_start = BACKOFF, now + backoff
        process.restarts += 1
        return BACKOFF
