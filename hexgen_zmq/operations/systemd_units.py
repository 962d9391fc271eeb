"""systemd units for one host of a deployment (`hexgen-zmq render systemd F --host NAME --out DIR`).

Two shapes: the host's supervisor as one unit (it restarts the processes, follows redeploys of F and
reports to `status`: the recommended one), or one unit per process with systemd's own restart policy and
a target that groups them (for operators who want every process in systemd's view; a redeploy then needs
the units rendered again and the changed ones restarted, since systemd does not read F).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from hexgen_zmq.operations.deployment import Deployment
from hexgen_zmq.operations.supervision import host_processes


def unit_name(host: str, process: str | None = None) -> str:
    base = f"hexgen-zmq-{host}"
    return f"{base}-{process.replace(':', '-')}.service" if process else f"{base}.service"


def _command(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "hexgen_zmq.cli", *args))


def _service(description: str, exec_start: str, working_dir: Path, extra_unit: str = "", extra_service: str = "",
             install: str = "WantedBy=multi-user.target") -> str:
    return f"""[Unit]
Description={description}
After=network-online.target
Wants=network-online.target
{extra_unit}
[Service]
Type=simple
ExecStart={exec_start}
WorkingDirectory={working_dir}
Environment=PYTHONUNBUFFERED=1
KillMode=mixed
TimeoutStopSec=30
{extra_service}
[Install]
{install}
"""


def supervisor_unit(config: Path, host: str, log_dir: Path | None = None) -> str:
    """The host's supervisor as a service; systemd restarts the supervisor itself should it ever fail."""
    args = ["up", str(config), "--host", host]
    if log_dir is not None:
        args += ["--log-dir", str(log_dir)]
    return _service(f"hexgen-zmq: every process of {config.name} on host {host}", _command(*args), config.parent,
                    extra_service="Restart=on-failure\nRestartSec=2\n")


def process_units(deployment: Deployment, config: Path, host: str, threads: int | None = None) -> dict[str, str]:
    """One unit per process of the host (Restart=on-failure with a start limit: systemd's crash-loop guard),
    each PartOf a target that starts and stops them together. Keyed by file name."""
    target = f"hexgen-zmq-{host}.target"
    wanted = host_processes(deployment, host)
    ranks = sum(1 for spec in wanted.values() if spec.pipeline is not None)
    threads = threads or max(1, (os.cpu_count() or 1) // max(ranks, 1))
    units = {target: f"""[Unit]
Description=hexgen-zmq: every process of {config.name} on host {host}
Wants={' '.join(unit_name(host, name) for name in wanted)}

[Install]
WantedBy=multi-user.target
"""}
    for name, spec in wanted.items():
        args = [*spec.args, "--config", str(config)]
        if spec.pipeline is not None:
            args += ["--threads", str(threads)]
        units[unit_name(host, name)] = _service(
            f"hexgen-zmq {name} of {config.name} on host {host}", _command(*args), config.parent,
            extra_unit=f"PartOf={target}\nStartLimitIntervalSec=120\nStartLimitBurst=5\n",
            extra_service="Restart=on-failure\nRestartSec=1\n", install=f"WantedBy={target}")
    return units


def render(deployment: Deployment, config: Path, host: str, out: Path, per_process: bool = False,
           log_dir: Path | None = None) -> list[Path]:
    """Write the host's units into `out`; returns their paths."""
    config = config.resolve()
    out.mkdir(parents=True, exist_ok=True)
    units = process_units(deployment, config, host) if per_process else {
        unit_name(host): supervisor_unit(config, host, log_dir)}
    paths = []
    for name, text in units.items():
        path = out / name
        path.write_text(text)
        paths.append(path)
    return paths
