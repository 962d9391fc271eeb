"""A deployment over emulated datacenters (tools/sites.py): deployment files whose hosts are the sites'
namespaces, one `hexgen-zmq up F --host NAME` supervisor per host, and waiting until the broker serves a
given layout. Used by tests/test_multisite.py and tools/bench_sites.py.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from hexgen_zmq.serving.client import Client, GenerationError
from tools.sites import Sites

REPO = Path(__file__).resolve().parent.parent


def public_key(keys_dir: Path, name: str) -> str:
    import zmq.auth

    public, _ = zmq.auth.load_certificate(str(keys_dir / f"{name}.key"))
    return public.decode()


def make_keys(sites: Sites, keys_dir: Path) -> None:
    """A key pair per host and one for the test client ("client"), as `hexgen-zmq keys` writes them."""
    from hexgen_zmq.wire.security import write_keys

    for name in [*sites.hosts, "client"]:
        if not (keys_dir / f"{name}.key_secret").exists():
            write_keys(name, keys_dir)


def layout(sites: Sites, model: str, pipelines: dict[str, list[tuple[str, int, int]]], broker_host: str = "a",
           keys_dir: Path | None = None, **broker) -> dict:
    """A deployment file: `pipelines` maps ids ("p0", "p1", ...) to stages as (host, first layer, end layer);
    a stage's inbound port follows its pipeline number and index, so an unchanged stage keeps its endpoint
    and a reshaped one reuses it (its old process must stop first). With `keys_dir` (see make_keys), every
    host has its public key and the client's key is admitted (CURVE); without, `security: insecure`."""
    at = sites.address(broker_host)
    hosts = [{"name": h, "address": sites.address(h), "region": sites.region(h)} for h in sites.hosts]
    if keys_dir is not None:
        for host in hosts:
            host["public_key"] = public_key(keys_dir, host["name"])
    spec = {
        "model": {"path": str(model), "dtype": "float32"},
        "hosts": hosts,
        "security": {"mode": "curve", "client_keys": [public_key(keys_dir, "client")]} if keys_dir else "insecure",
        "broker": {"host": broker_host, "clients": f"tcp://{at}:5555", "results": f"tcp://{at}:5556",
                   "stage_timeout_s": 1.5, "progress_timeout_s": 20, **broker},
        "pipelines": [],
    }
    for pipeline_id, stages in sorted(pipelines.items()):
        number = int(pipeline_id[1:])
        spec["pipelines"].append({"id": pipeline_id, "stages": [
            {"id": f"{pipeline_id}s{k}", "layers": [start, end],
             "inbound": f"tcp://{sites.address(host)}:{7000 + 10 * number + k}",
             "tp_init": f"tcp://127.0.0.1:{7500 + 10 * number + k}", "ranks": [{"host": host}]}
            for k, (host, start, end) in enumerate(stages)]})
    return spec


class SiteDeployment:
    """The deployment file in `directory` and one supervisor per host of `sites`, each in its namespace."""

    def __init__(self, sites: Sites, model: str, directory: Path, pipelines: dict, threads: int = 1,
                 secure: bool = True, **broker):
        self.sites, self.model, self.dir, self.threads = sites, model, Path(directory), threads
        self.keys_dir = self.dir / "keys" if secure else None
        self.credentials: dict = {}
        if self.keys_dir is not None:
            make_keys(sites, self.keys_dir)
            self.credentials = {"keys": str(self.keys_dir / "client.key_secret"),
                                "server_key": public_key(self.keys_dir, "a")}
        self.config = self.dir / "deployment.yaml"
        self.config.write_text(yaml.safe_dump(layout(sites, model, pipelines, keys_dir=self.keys_dir, **broker)))
        self.address = f"tcp://{sites.address('a')}:5555"
        self.supervisors: dict[str, subprocess.Popen] = {}
        for host in sites.hosts:
            self.start_supervisor(host)

    def start_supervisor(self, host: str) -> None:
        with open(self.dir / f"supervisor-{host}.log", "ab") as log:
            self.supervisors[host] = self.sites.popen(
                host, [sys.executable, "-m", "hexgen_zmq.cli", "up", str(self.config), "--host", host,
                       "--threads", str(self.threads), "--log-dir", str(self.dir / f"logs-{host}"),
                       *(["--keys", str(self.keys_dir)] if self.keys_dir else [])],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def redeploy(self, pipelines: dict, **broker) -> Path:
        """Write a new version and put it in place with `hexgen-zmq redeploy`; returns the new file."""
        new = self.dir / "new.yaml"
        new.write_text(yaml.safe_dump(layout(self.sites, self.model, pipelines, keys_dir=self.keys_dir, **broker)))
        result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "redeploy", str(self.config), str(new)],
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        return new

    def connect(self) -> Client:
        """A client of the broker (with the client's key when the deployment uses CURVE)."""
        return Client.connect(self.address, **self.credentials)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
                         for p in sorted(self.dir.glob("supervisor-*.log")))

    def stop(self) -> None:
        for process in self.supervisors.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.supervisors.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


async def status(deployment: SiteDeployment):
    async with await deployment.connect() as client:
        return await asyncio.wait_for(client.status(), 5)


async def serving(deployment: SiteDeployment, pipelines: set[str], timeout_s: float,
                  file_version: str | None = None):
    """Wait until the broker serves exactly these pipelines, each ready and healthy (at that file version)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            reply = await status(deployment)
            live = {p.id for p in reply.pipelines if p.ready and p.healthy and not p.retiring}
            if live == pipelines and len(reply.pipelines) == len(pipelines) and \
                    (file_version is None or reply.file_version == file_version):
                return reply
        except (asyncio.TimeoutError, OSError, GenerationError):  # not up yet, or not admitting this key yet
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not serving {sorted(pipelines)} after {timeout_s} s\n{deployment.logs()}")
        await asyncio.sleep(0.25)
