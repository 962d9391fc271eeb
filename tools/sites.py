"""Emulated datacenters on one machine: hosts as network namespaces, regions joined by shaped links.

Multi-site behaviour (activations crossing a WAN, a host lost, a region cut off) has to be tested with real
addresses, real bandwidth limits and real latency, without leaving the machine. This module builds that:

- every host is a network namespace `PREFIX-HOST` with its own IPv4 address (loopback up, too);
- the hosts of a region share a bridge in the router namespace `PREFIX-router`; inside a region nothing is
  shaped;
- a packet from one region to another is sent by policy routing (incoming bridge, destination region) into a
  TUN device, one per direction of a link; `tc tbf` on that TUN limits the rate, `tools/delay_line.py` holds
  each packet for the link's one-way latency and writes it back, and the kernel routes it on to the
  destination region. Addresses are never rewritten;
- regions without a link between them cannot reach each other;
- the calling (root) namespace reaches every host over a veth `PREFIX-rt` with a route for the emulated subnet
  only, without delay or shaping: test clients run there.

Nothing is routed outside the subnet, so no emulated traffic can leave the machine. Everything is removed by
`down()` (the context manager calls it, also after an exception), and a stale set left by a crashed run with
the same prefix is removed by `up()` before it builds.

    with Sites({"regions": {"eu": ["a", "b"], "us": ["c"]},
                "links": [{"a": "eu", "b": "us", "mbit": 300, "latency_ms": 20}]}, prefix="hxt") as sites:
        server = sites.popen("c", ["python", "-m", "http.server", "--bind", sites.address("c")])

CLI for people: `python tools/sites.py up SPEC.yaml [--prefix P]` builds and leaves it running (enter a host
with `ip netns exec P-HOST bash`); `python tools/sites.py down [--prefix P]` removes it. Needs root.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_PREFIX = "hxs"
DEFAULT_SUBNET = "10.237.0.0/16"
DEFAULT_MTU = 65000
DELAY_LINE = Path(__file__).resolve().with_name("delay_line.py")
ROUTER = "router"
COMMAND_TIMEOUT_S = 20.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.]*$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,9}$")  # PREFIX-rt must fit in 15 characters


class SitesUnavailable(RuntimeError):
    """This machine cannot build emulated sites (not root, no `ip`, no TUN)."""


def unavailable_reason() -> str | None:
    """Why emulated sites cannot be built here, or None when they can: a pytest skip reason."""
    if os.geteuid() != 0:
        return "emulated sites need root (network namespaces, veths, TUN devices)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulated sites need the `{tool}` command (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "emulated sites need /dev/net/tun"
    return None


def require_root() -> None:
    """Raise SitesUnavailable with the reason when this machine cannot build emulated sites."""
    reason = unavailable_reason()
    if reason is not None:
        raise SitesUnavailable(reason)


# ------------------------------------------------------------------------------------------ topology
@dataclasses.dataclass(frozen=True)
class Link:
    """A link between two regions; each direction gets `mbit` (None: unshaped) and `latency_ms` one way."""

    a: str
    b: str
    mbit: float | None = None
    latency_ms: float = 0.0


@dataclasses.dataclass(frozen=True)
class Topology:
    """Regions (name -> host names, in order) and the links between them."""

    regions: dict[str, list[str]]
    links: list[Link]

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Topology:
        """Validate a spec dict (as in the module docstring, or loaded from YAML) and return the topology."""
        unknown = set(spec) - {"regions", "links"}
        if unknown:
            raise ValueError(f"unknown topology fields: {sorted(unknown)}")
        regions = {str(r): [str(h) for h in hosts] for r, hosts in dict(spec.get("regions") or {}).items()}
        if not regions:
            raise ValueError("regions: at least one region is needed")
        seen: set[str] = set()
        for region, hosts in regions.items():
            if not _NAME.match(region):
                raise ValueError(f"regions.{region}: a name of letters, digits, '_' and '.'")
            if not hosts:
                raise ValueError(f"regions.{region}: no hosts")
            if len(hosts) > 200:
                raise ValueError(f"regions.{region}: at most 200 hosts")
            for host in hosts:
                if not _NAME.match(host) or host == ROUTER:
                    raise ValueError(f"regions.{region}: bad host name {host!r}")
                if host in seen:
                    raise ValueError(f"regions.{region}: host {host!r} appears twice")
                seen.add(host)
        links = []
        pairs: set[frozenset[str]] = set()
        for i, item in enumerate(spec.get("links") or []):
            extra = set(item) - {"a", "b", "mbit", "latency_ms"}
            if extra:
                raise ValueError(f"links[{i}]: unknown fields {sorted(extra)}")
            link = Link(str(item["a"]), str(item["b"]),
                        None if item.get("mbit") is None else float(item["mbit"]),
                        float(item.get("latency_ms", 0.0)))
            for end in (link.a, link.b):
                if end not in regions:
                    raise ValueError(f"links[{i}]: unknown region {end!r}")
            if link.a == link.b or frozenset((link.a, link.b)) in pairs:
                raise ValueError(f"links[{i}]: a link joins two different regions, once")
            if (link.mbit is not None and link.mbit <= 0) or link.latency_ms < 0:
                raise ValueError(f"links[{i}]: mbit must be > 0 and latency_ms >= 0")
            pairs.add(frozenset((link.a, link.b)))
            links.append(link)
        return cls(regions, links)


@dataclasses.dataclass(frozen=True)
class LinkCounter:
    """What crossed one direction of a link: delivered bytes/packets (IP headers included), tbf drops."""

    bytes: int
    packets: int
    dropped: int


@dataclasses.dataclass(frozen=True)
class _Direction:
    src: str
    dst: str
    tun: str
    table: int
    link: Link


def tbf_burst_bytes(mbit: float, mtu: int = DEFAULT_MTU) -> int:
    """The tbf bucket for a rate: two full packets at least (a smaller bucket drops them), or 4 ms of rate.

    A transfer may take up to this many bytes more than the rate allows; lower bounds subtract it.
    """
    return max(2 * (mtu + 64), int(mbit * 1e6 / 8 * 0.004))


def _tbf_limit_bytes(mbit: float, mtu: int) -> int:
    """The tbf queue: 50 ms of rate, but room for four full packets."""
    return max(4 * (mtu + 64), int(mbit * 1e6 / 8 * 0.05))


# ------------------------------------------------------------------------------------------ commands
def _run(argv: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run a setup command; on failure raise with the command and its stderr."""
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    return _run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def _sysctl(ns: str, *settings: str) -> None:
    _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings])


def _namespaces(prefix: str) -> list[str]:
    """Existing namespaces made for this prefix."""
    out = _run(["ip", "-j", "netns", "list"], check=False).strip()
    names = [entry["name"] for entry in json.loads(out)] if out else []
    return [name for name in names if name.startswith(prefix + "-")]


def _netns_pids(ns: str) -> list[int]:
    return [int(pid) for pid in _run(["ip", "netns", "pids", ns], check=False).split()]


def _wait_in_namespace(process: subprocess.Popen, ns: str, timeout: float = 10.0) -> None:
    """Return once `process` (started by `ip netns exec ns`) is inside the namespace, or has ended: until
    `ip netns exec` has called setns, `ip netns pids` does not list it, and a host killed at that moment
    would lose every process but that one."""
    want = os.stat(f"/run/netns/{ns}").st_ino
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        try:
            if os.stat(f"/proc/{process.pid}/ns/net").st_ino == want:
                return
        except FileNotFoundError:  # gone between poll and stat
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {process.pid} did not enter namespace {ns} in {timeout:.0f} s")
        time.sleep(0.001)


def _kill_namespace(ns: str, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process in a namespace and wait until none is left; return the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := _netns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {ns} survive SIGKILL")
        time.sleep(0.02)
    return sorted(set(killed))


def remove_prefix(prefix: str) -> None:
    """Remove everything a Sites with this prefix made (its namespaces, their processes, the root veth).

    Safe to call when nothing is there; `up()` calls it first to clear a crashed run's leftovers.
    """
    if _ip("link", "show", "dev", f"{prefix}-rt", check=False):
        _ip("link", "del", "dev", f"{prefix}-rt", check=False)
    for ns in _namespaces(prefix):
        _kill_namespace(ns)
        _ip("netns", "del", ns, check=False)


# ------------------------------------------------------------------------------------------ sites
class Sites:
    """Hosts in regions on this machine, each a network namespace; see the module docstring."""

    def __init__(self, spec: Mapping[str, Any] | Topology, prefix: str = DEFAULT_PREFIX,
                 subnet: str = DEFAULT_SUBNET, mtu: int = DEFAULT_MTU) -> None:
        self.topology = spec if isinstance(spec, Topology) else Topology.from_spec(spec)
        if not _PREFIX.match(prefix):
            raise ValueError(f"prefix {prefix!r}: 1-10 lowercase letters and digits, starting with a letter")
        self.prefix = prefix
        self.mtu = mtu
        self.subnet = ipaddress.ip_network(subnet)
        blocks = list(self.subnet.subnets(new_prefix=24)) if self.subnet.prefixlen <= 24 else []
        if len(blocks) < len(self.topology.regions) + 1:
            raise ValueError(f"subnet {subnet}: needs a /24 for the root link and one per region")
        self.router = f"{prefix}-{ROUTER}"
        self._root_link = f"{prefix}-rt"
        self._root_block = blocks[0]  # .1 the router, .2 the root namespace
        self._region_index = {region: i for i, region in enumerate(self.topology.regions)}
        self._region_block = {region: blocks[i + 1] for region, i in self._region_index.items()}
        self._host_region: dict[str, str] = {}
        self._host_address: dict[str, str] = {}
        self._host_port: dict[str, str] = {}  # the host's veth end in the router namespace
        for region, hosts in self.topology.regions.items():
            for k, host in enumerate(hosts):
                self._host_region[host] = region
                self._host_address[host] = str(self._region_block[region][10 + k])
                self._host_port[host] = f"h{len(self._host_port)}"
        self._directions: list[_Direction] = []
        for i, link in enumerate(self.topology.links):
            for j, (src, dst) in enumerate(((link.a, link.b), (link.b, link.a))):
                self._directions.append(_Direction(src, dst, f"l{i}{'ab'[j]}", 100 + 2 * i + j, link))
        self._delay_line: subprocess.Popen | None = None
        self._children: list[tuple[str, subprocess.Popen]] = []

    # ------------------------------------------------------------------ queries
    @property
    def hosts(self) -> list[str]:
        return list(self._host_region)

    def address(self, host: str) -> str:
        """The host's IPv4 address, reachable from every host and from the calling namespace."""
        return self._host_address[self._check_host(host)]

    def region(self, host: str) -> str:
        return self._host_region[self._check_host(host)]

    def namespace(self, host: str) -> str:
        """The host's network namespace name, for `ip netns exec`."""
        return f"{self.prefix}-{self._check_host(host)}"

    def router_address(self, region: str) -> str:
        """The router's address on a region's bridge (the hosts' gateway to the rest of the subnet)."""
        return str(self._region_block[region][1])

    def _check_host(self, host: str) -> str:
        if host not in self._host_region:
            raise KeyError(f"unknown host {host!r}; hosts: {', '.join(self._host_region)}")
        return host

    # ------------------------------------------------------------------ processes
    def popen(self, host: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen:
        """Start argv inside the host's namespace (`ip netns exec` execs it, so the pid is argv's own); it is
        in the namespace when this returns.

        The process is reaped by `down()` and killed with its host by `kill_host`.
        """
        process = subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], **popen_kwargs)
        self._children.append((host, process))
        _wait_in_namespace(process, self.namespace(host))
        return process

    def run(self, host: str, argv: Sequence[str], timeout: float = 30.0, check: bool = True,
            **run_kwargs: Any) -> subprocess.CompletedProcess:
        """Run a quick command inside the host's namespace and return its result (text output captured)."""
        run_kwargs.setdefault("capture_output", True)
        run_kwargs.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.namespace(host), *argv], timeout=timeout,
                              check=check, **run_kwargs)

    def kill_host(self, host: str) -> list[int]:
        """SIGKILL every process in the host's namespace (a lost machine); return their pids."""
        killed = _kill_namespace(self.namespace(host))
        self._reap(host)
        return killed

    def isolate_host(self, host: str, isolated: bool = True) -> None:
        """Cut the host off the network (its port on the region bridge goes down), or reconnect it."""
        _ip("link", "set", "dev", self._host_port[self._check_host(host)], "down" if isolated else "up",
            ns=self.router)

    def _reap(self, host: str | None = None, timeout: float = 5.0) -> None:
        keep = []
        for owner, process in self._children:
            if host is not None and owner != host:
                keep.append((owner, process))
                continue
            if process.poll() is None:
                process.kill()
            process.wait(timeout=timeout)
        self._children = keep

    # ------------------------------------------------------------------ counters
    def link_counters(self) -> dict[tuple[str, str], LinkCounter]:
        """Per direction (source region, destination region): what crossed that link so far.

        Counted on the TUN as packets leave the delay line, so they really passed the rate limit and delay.
        """
        stats = {entry["ifname"]: entry["stats64"]["rx"]
                 for entry in json.loads(_ip("-j", "-s", "link", "show", ns=self.router))}
        qdiscs = json.loads(_run(["tc", "-n", self.router, "-j", "-s", "qdisc", "show"]) or "[]")
        drops = {q["dev"]: q.get("drops", 0) for q in qdiscs if q.get("kind") == "tbf"}
        return {(d.src, d.dst): LinkCounter(stats[d.tun]["bytes"], stats[d.tun]["packets"],
                                            drops.get(d.tun, 0))
                for d in self._directions}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Sites:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    def up(self) -> None:
        """Build everything (after removing a stale set with this prefix); on any failure remove it again."""
        require_root()
        remove_prefix(self.prefix)
        self._check_subnet_free()
        try:
            self._build_router()
            for region in self.topology.regions:
                self._build_region(region)
            self._build_links()
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove everything this prefix made: processes, namespaces, veths, routes. Idempotent."""
        try:
            remove_prefix(self.prefix)
        finally:
            self._reap()
            if self._delay_line is not None:
                if self._delay_line.poll() is None:
                    self._delay_line.kill()
                self._delay_line.wait(timeout=5)
                self._delay_line = None

    def _check_subnet_free(self) -> None:
        for route in json.loads(_ip("-j", "route", "show") or "[]"):
            dst = route.get("dst", "default")
            if dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(self.subnet):
                raise RuntimeError(f"subnet {self.subnet} is already routed here ({dst} dev {route.get('dev')}):"
                                   " another Sites may use it; pick another subnet, or `sites.py down --prefix`")

    def _build_router(self) -> None:
        ns, mtu = self.router, str(self.mtu)
        _ip("netns", "add", ns)
        _sysctl(ns, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1")
        _ip("link", "set", "dev", "lo", "up", ns=ns)
        _ip("link", "add", self._root_link, "mtu", mtu, "type", "veth", "peer", "name", "rt0", "mtu", mtu, "netns", ns)
        _ip("addr", "add", f"{self._root_block[1]}/{self._root_block.prefixlen}", "dev", "rt0", ns=ns)
        _ip("link", "set", "dev", "rt0", "up", ns=ns)
        _ip("addr", "add", f"{self._root_block[2]}/{self._root_block.prefixlen}", "dev", self._root_link)
        _ip("link", "set", "dev", self._root_link, "up")
        _ip("route", "add", str(self.subnet), "via", str(self._root_block[1]), "dev", self._root_link)

    def _build_region(self, region: str) -> None:
        bridge, block, mtu = f"br{self._region_index[region]}", self._region_block[region], str(self.mtu)
        _ip("link", "add", bridge, "type", "bridge", ns=self.router)
        for host in self.topology.regions[region]:
            ns, port = self.namespace(host), self._host_port[host]
            _ip("netns", "add", ns)
            _sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
            _ip("link", "set", "dev", "lo", "up", ns=ns)
            _ip("link", "add", port, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "mtu", mtu, "netns", ns,
                ns=self.router)
            _ip("link", "set", "dev", port, "master", bridge, "up", ns=self.router)
            _ip("addr", "add", f"{self._host_address[host]}/{block.prefixlen}", "dev", "eth0", ns=ns)
            _ip("link", "set", "dev", "eth0", "up", ns=ns)
            _ip("route", "add", str(self.subnet), "via", self.router_address(region), ns=ns)
        _ip("link", "set", "dev", bridge, "mtu", mtu, ns=self.router)
        _ip("addr", "add", f"{self.router_address(region)}/{block.prefixlen}", "dev", bridge, ns=self.router)
        _ip("link", "set", "dev", bridge, "up", ns=self.router)

    def _build_links(self) -> None:
        ns = self.router
        for d in self._directions:
            _ip("tuntap", "add", "dev", d.tun, "mode", "tun", ns=ns)
            _ip("link", "set", "dev", d.tun, "mtu", str(self.mtu), "up", ns=ns)
            if d.link.mbit is not None:
                _run(["tc", "-n", ns, "qdisc", "add", "dev", d.tun, "root", "tbf",
                      "rate", f"{d.link.mbit}mbit", "burst", str(tbf_burst_bytes(d.link.mbit, self.mtu)),
                      "limit", str(_tbf_limit_bytes(d.link.mbit, self.mtu))])
        if self._directions:
            self._start_delay_line()
        tables = {(d.src, d.dst): d.table for d in self._directions}
        for d in self._directions:
            _ip("route", "add", "default", "dev", d.tun, "table", str(d.table), ns=ns)
        for src in self.topology.regions:
            for dst in self.topology.regions:
                if src == dst:
                    continue
                rule = ["rule", "add", "pref", "1000", "iif", f"br{self._region_index[src]}",
                        "to", str(self._region_block[dst])]
                action = ["table", str(tables[src, dst])] if (src, dst) in tables else ["prohibit"]
                _ip(*rule, *action, ns=ns)

    def _start_delay_line(self, timeout: float = 10.0) -> None:
        argv = [sys.executable, str(DELAY_LINE)]
        for d in self._directions:
            argv += ["--tun", f"{d.tun}:{d.link.latency_ms}"]
        # Its own session: a Ctrl-C meant for the caller must not take the links down before `down()`.
        self._delay_line = subprocess.Popen(["ip", "netns", "exec", self.router, *argv], stdout=subprocess.PIPE,
                                            text=True, start_new_session=True)
        assert self._delay_line.stdout is not None
        ready, _, _ = select.select([self._delay_line.stdout], [], [], timeout)
        line = self._delay_line.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise RuntimeError(f"the delay line did not start (exit {self._delay_line.poll()}, said {line!r})")
        self._delay_line.stdout.close()


# ------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Emulated datacenters: hosts in network namespaces.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the sites of SPEC.yaml and leave them running")
    up.add_argument("spec", type=Path)
    down = sub.add_parser("down", help="remove the sites of a prefix")
    for p in (up, down):
        p.add_argument("--prefix", default=DEFAULT_PREFIX)
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    args = parser.parse_args(argv)
    try:
        require_root()
    except SitesUnavailable as e:
        print(f"sites: {e}", file=sys.stderr)
        return 2
    if args.command == "down":
        remove_prefix(args.prefix)
        print(f"removed every namespace and link of prefix {args.prefix!r}")
        return 0
    import yaml

    try:
        sites = Sites(yaml.safe_load(args.spec.read_text()), prefix=args.prefix, subnet=args.subnet)
        sites.up()
    except (ValueError, RuntimeError) as e:
        print(f"sites: {e}", file=sys.stderr)
        return 1
    for host in sites.hosts:
        print(f"{host:12} {sites.region(host):10} {sites.address(host):15} ip netns exec {sites.namespace(host)} ...")
    for link in sites.topology.links:
        print(f"link {link.a} <-> {link.b}: {link.mbit or 'unshaped'} Mbit/s, {link.latency_ms} ms each way")
    print(f"remove with: python {sys.argv[0]} down --prefix {args.prefix}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
