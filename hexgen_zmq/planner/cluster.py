"""The cluster description (DESIGN.md contract): load, validate with field-path errors, and query links.

GPUs of one type on one host are interchangeable to the planner, so the cluster is flattened into *slots*:
`(host, gpu type, count, first device index)`. Device indices on a host follow the order of its `gpus:`
mapping (`{A6000: 8, A5000: 4}`: cuda:0-7 are A6000, cuda:8-11 are A5000).

A host may name a profile (`profile: PATH`, relative to the cluster file; written by `hexgen-zmq profile`).
Its devices then carry the measured figures, and the profile's own device kind may be used as a GPU type
(`gpus: {cpu: 2}`: two single-threaded CPU ranks, if the profile was measured with one thread), so a CPU
host is planned like any other. The profile's measured links to other hosts of the cluster replace the
region defaults for those host pairs (goodput as measured: the TCP efficiency factor is not applied again).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hexgen_zmq.planner import constants as C
from hexgen_zmq.planner.catalog import CATALOG, GpuSpec
from hexgen_zmq.planner.profile import Profile, ProfileError, load_profile


class ClusterError(ValueError):
    """An invalid cluster description; the message starts with the offending field's path."""


@dataclass(frozen=True, slots=True)
class Link:
    gbps: float
    latency_ms: float

    @property
    def bandwidth(self) -> float:
        """Effective bytes per second."""
        return self.gbps * 1e9 / 8 * C.LINK_EFFICIENCY

    @property
    def latency(self) -> float:
        return self.latency_ms / 1000

    def transfer(self, nbytes: float) -> float:
        """Seconds to move one message of `nbytes` over this link."""
        return self.latency + (nbytes + C.MESSAGE_HEADER_BYTES) / self.bandwidth


@dataclass(frozen=True, slots=True)
class Host:
    name: str
    address: str
    region: str
    gpus: tuple[tuple[str, int], ...]  # keys of Cluster.gpu_types (NAME@HOST for a profiled host's devices)
    profile: Profile | None = None


@dataclass(frozen=True, slots=True)
class Slot:
    """All GPUs of one type on one host."""

    index: int
    host: int
    gpu: GpuSpec
    count: int
    first_device: int


@dataclass(slots=True)
class Cluster:
    gpu_types: dict[str, GpuSpec]
    hosts: tuple[Host, ...]
    intra_host: Link
    intra_region: Link
    between: dict[frozenset[str], Link]
    slots: tuple[Slot, ...] = ()
    assumed_links: list[tuple[str, str]] = field(default_factory=list)
    host_links: dict[frozenset[int], Link] = field(default_factory=dict)  # measured, from host profiles

    def __post_init__(self) -> None:
        slots: list[Slot] = []
        for h, host in enumerate(self.hosts):
            device = 0
            for gpu_name, count in host.gpus:
                slots.append(Slot(len(slots), h, self.gpu_types[gpu_name], count, device))
                device += count
        self.slots = tuple(slots)
        regions = self.regions
        for i, a in enumerate(regions):
            for b in regions[i + 1 :]:
                if frozenset((a, b)) not in self.between:
                    self.between[frozenset((a, b))] = Link(C.DEFAULT_WAN_GBPS, C.DEFAULT_WAN_LATENCY_MS)
                    self.assumed_links.append((a, b))

    @property
    def regions(self) -> list[str]:
        """Regions in order of first appearance."""
        return list(dict.fromkeys(h.region for h in self.hosts))

    @property
    def total_gpus(self) -> int:
        return sum(s.count for s in self.slots)

    def link(self, host_a: int, host_b: int) -> Link:
        """The link a message crosses from host_a to host_b."""
        if host_a == host_b:
            return self.intra_host
        measured = self.host_links.get(frozenset((host_a, host_b)))
        if measured is not None:
            return measured
        ra, rb = self.hosts[host_a].region, self.hosts[host_b].region
        if ra == rb:
            return self.intra_region
        return self.between[frozenset((ra, rb))]


def load_cluster(path: str | Path) -> Cluster:
    """Read and validate a cluster YAML file (profiles it names are read relative to it)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ClusterError(f"{path}: not valid YAML: {exc}") from exc
    return parse_cluster(data, Path(path).parent)


def parse_cluster(data: Any, base: Path | None = None) -> Cluster:
    """Validate a parsed cluster description; every error names its field path. `base`: the directory that
    relative profile paths start from (default: the current directory)."""
    _mapping(data, "", {"gpus", "hosts", "links"})
    gpu_types = dict(CATALOG)
    for name, entry in (_mapping(data.get("gpus", {}), "gpus") or {}).items():
        gpu_types[str(name)] = _gpu_entry(entry, f"gpus.{name}", gpu_types.get(str(name)), str(name))
    hosts = _hosts(data.get("hosts"), gpu_types, base or Path("."))
    links = _mapping(data.get("links", {}), "links", {"intra_host", "intra_region", "between"}) or {}
    intra_host = _link(links.get("intra_host"), "links.intra_host", C.DEFAULT_INTRA_HOST)
    intra_region = _link(links.get("intra_region"), "links.intra_region", C.DEFAULT_INTRA_REGION)
    regions = {h.region for h in hosts}
    between: dict[frozenset[str], Link] = {}
    raw_between = links.get("between", [])
    if not isinstance(raw_between, list):
        raise ClusterError("links.between: expected a list")
    for i, entry in enumerate(raw_between):
        where = f"links.between[{i}]"
        _mapping(entry, where, {"a", "b", "gbps", "latency_ms"})
        ends = []
        for key in ("a", "b"):
            if key not in entry:
                raise ClusterError(f"{where}.{key}: missing")
            if str(entry[key]) not in regions:
                raise ClusterError(f"{where}.{key}: unknown region {entry[key]!r}")
            ends.append(str(entry[key]))
        if ends[0] == ends[1]:
            raise ClusterError(f"{where}: a link joins two different regions (use links.intra_region)")
        pair = frozenset(ends)
        if pair in between:
            raise ClusterError(f"{where}: second link between {ends[0]} and {ends[1]}")
        between[pair] = _link(entry, where, None)
    return Cluster(gpu_types, tuple(hosts), intra_host, intra_region, between, host_links=_measured_links(hosts))


def _measured_links(hosts: list[Host]) -> dict[frozenset[int], Link]:
    """Links measured by host profiles, per host pair (the first profile to measure a pair counts)."""
    index = {h.name: i for i, h in enumerate(hosts)}
    links: dict[frozenset[int], Link] = {}
    for i, host in enumerate(hosts):
        for k, figure in enumerate(host.profile.links if host.profile else ()):
            if figure.peer not in index:
                raise ClusterError(f"hosts[{i}].profile: links[{k}].peer: {figure.peer!r} is not a host of this cluster")
            pair = frozenset((i, index[figure.peer]))
            if len(pair) == 2 and pair not in links:
                links[pair] = Link(figure.gbps / C.LINK_EFFICIENCY, figure.latency_ms)
    return links


def _mapping(value: Any, where: str, allowed: set[str] | None = None) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ClusterError(f"{where or '<top level>'}: expected a mapping")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                prefix = f"{where}." if where else ""
                raise ClusterError(f"{prefix}{key}: unknown field (expected one of {', '.join(sorted(allowed))})")
    return value


def _number(value: Any, where: str, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ClusterError(f"{where}: expected a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ClusterError(f"{where}: must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _gpu_entry(entry: Any, where: str, base: GpuSpec | None, name: str) -> GpuSpec:
    fields = ("memory_gib", "fp16_tflops", "hbm_gbps")
    _mapping(entry, where, set(fields))
    entry = entry or {}
    values = {}
    for key in fields:
        if key in entry:
            values[key] = _number(entry[key], f"{where}.{key}")
        elif base is not None:
            values[key] = getattr(base, key)
        else:
            raise ClusterError(f"{where}.{key}: missing (required for a GPU type not in the catalog)")
    return GpuSpec(name, **values)


def _profiled(gpu_types: dict[str, GpuSpec], name: str, profile: Profile, host: str) -> str | None:
    """Register this host's devices of type `name` with their profile; the key they go by (None: unknown)."""
    base = gpu_types.get(name)
    if base is None and name != profile.device.name:
        return None
    if base is None:
        flops, bandwidth, _ = profile.effective()
        base = GpuSpec(name, profile.device.memory_gib, flops / 1e12, bandwidth / 1e9)
    key = f"{name}@{host}"
    gpu_types[key] = dataclasses.replace(base, kind=profile.device.kind, profile=profile)
    return key


def _hosts(raw: Any, gpu_types: dict[str, GpuSpec], base: Path) -> list[Host]:
    if not isinstance(raw, list) or not raw:
        raise ClusterError("hosts: expected a non-empty list")
    hosts: list[Host] = []
    names: set[str] = set()
    addresses: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"hosts[{i}]"
        _mapping(entry, where, {"name", "address", "region", "gpus", "profile"})
        if entry is None:
            raise ClusterError(f"{where}: expected a mapping")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ClusterError(f"{where}.name: expected a non-empty string")
        if name in names:
            raise ClusterError(f"{where}.name: duplicate host name {name!r}")
        address = entry.get("address", name)
        if not isinstance(address, str) or not address or any(c in address for c in " /:"):
            raise ClusterError(f"{where}.address: expected a host name or IP address, got {address!r}")
        if address in addresses:
            raise ClusterError(f"{where}.address: duplicate address {address!r}")
        region = entry.get("region", "default")
        if not isinstance(region, str) or not region:
            raise ClusterError(f"{where}.region: expected a non-empty string")
        gpus = _mapping(entry.get("gpus"), f"{where}.gpus")
        if not gpus:
            raise ClusterError(f"{where}.gpus: expected a mapping of GPU type to count")
        profile = None
        if "profile" in entry:
            if not isinstance(entry["profile"], str) or not entry["profile"]:
                raise ClusterError(f"{where}.profile: expected the path of a profile file")
            try:
                profile = load_profile(base / entry["profile"])
            except ProfileError as exc:
                raise ClusterError(f"{where}.profile: {exc}") from exc
        counts = []
        for gpu_name, count in gpus.items():
            key = str(gpu_name) if profile is None else _profiled(gpu_types, str(gpu_name), profile, name)
            if key not in gpu_types:
                raise ClusterError(f"{where}.gpus.{gpu_name}: unknown GPU type (add it under gpus:)")
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ClusterError(f"{where}.gpus.{gpu_name}: expected a positive integer count, got {count!r}")
            counts.append((key, count))
        names.add(name)
        addresses.add(address)
        hosts.append(Host(name, address, region, tuple(counts), profile))
    return hosts


def _link(entry: Any, where: str, default: tuple[float, float] | None) -> Link:
    if entry is None and default is not None:
        return Link(*default)
    _mapping(entry, where)
    if entry is None:
        raise ClusterError(f"{where}: expected a mapping")
    if default is not None:
        _mapping(entry, where, {"gbps", "latency_ms"})
    for key in ("gbps", "latency_ms"):
        if key not in entry:
            raise ClusterError(f"{where}.{key}: missing")
    gbps = _number(entry["gbps"], f"{where}.gbps")
    latency = _number(entry["latency_ms"], f"{where}.latency_ms", strict=False)
    return Link(gbps, latency)
