"""The deployment file (DESIGN.md contract): typed schema, loading, and validation with field-path errors.

Every process reads the same file and picks its part (`stage(ID)`, `broker`). Loading checks the schema
(msgspec), then the layout: unique ids and endpoints, each pipeline's layer ranges covering the model once,
TP degrees the model's heads can take, and (optionally) the checkpoint itself. Unknown fields are accepted
so that planners can annotate files; torch is not needed here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from hexgen_zmq.model.info import CheckpointError, ModelInfo, read_model_info

PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
ENDPOINT = re.compile(r"^tcp://(?P<host>[A-Za-z0-9_.\-]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
Z85_KEY = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-]{0,252})$")


class DeploymentError(ValueError):
    """An invalid deployment file; the message starts with the field path."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class Struct(msgspec.Struct, frozen=True, kw_only=True):
    pass


class ModelSpec(Struct, frozen=True):
    path: str
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class HostSpec(Struct, frozen=True):
    """A host named in `hosts:`; ranks and the broker are placed on it by name."""

    name: str
    address: str
    public_key: str | None = None  # its CurveZMQ public key (z85), for encrypted links between hosts
    region: str | None = None  # informational (what the planner placed it in)


class SecuritySpec(Struct, frozen=True):
    """CurveZMQ between hosts: `curve` encrypts and authenticates every socket bound off loopback."""

    mode: Literal["curve", "insecure"] = "curve"
    client_keys: list[str] = []  # z85 public keys admitted on the broker's client socket
    client_keys_file: str | None = None  # or one key per line in this file (relative to the deployment file)


class BrokerSpec(Struct, frozen=True):
    clients: str
    results: str
    host: str | None = None  # a name from `hosts:`; without it, the host is the one of `clients`
    queue_limit: Annotated[int, msgspec.Meta(ge=0)] = 256  # requests waiting for room before "busy"
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0  # default per-request deadline
    stage_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 3.0  # silence after which a stage is lost
    client_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # silence after which a client is gone
    # A pipeline holding requests that emits no token for this long, while no stage reports a step that is
    # still running, has lost work (a dropped micro-batch): it is failed. A step that runs longer than this
    # counts as stuck.
    progress_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 4  # per request: the first, and replays after failures
    # When a redeploy removes or changes a pipeline: "replay" moves its requests to other pipelines at once
    # (from the tokens they have); "finish" lets them end where they are, up to drain_timeout_s, then replays
    # what is left.
    redeploy: Literal["replay", "finish"] = "replay"
    drain_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0


class RankSpec(Struct, frozen=True):
    host: str
    device: str = "cpu"


class StageSpec(Struct, frozen=True):
    id: str
    layers: tuple[int, int]
    inbound: str
    tp_init: str
    ranks: list[RankSpec]
    kv_cache_tokens: PositiveInt | None = None  # KV budget; derived from memory when absent
    max_batch_tokens: PositiveInt = 1024  # token budget of one step
    tp_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0  # a TP rank silent this long while serving is lost
    start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0  # for the ranks of a TP group to load and meet
    idle_release_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0  # KV of a request with no work this long is freed

    @property
    def tp(self) -> int:
        return len(self.ranks)


class PipelineSpec(Struct, frozen=True):
    id: str
    stages: list[StageSpec]
    # How many micro-batches the running requests are split into. Default: one per stage when the stages
    # have devices of their own (GPUs, or CPU stages on different hosts), one in all when they share cores.
    micro_batches: PositiveInt | None = None

    def default_micro_batches(self) -> int:
        if self.micro_batches:
            return self.micro_batches
        if any(rank.device.startswith("cuda") for stage in self.stages for rank in stage.ranks):
            return len(self.stages)
        return len({stage.ranks[0].host for stage in self.stages})


class Deployment(Struct, frozen=True):
    model: ModelSpec
    broker: BrokerSpec
    pipelines: list[PipelineSpec]
    hosts: list[HostSpec] = []
    # "insecure" (or mode: insecure) to run in the clear off loopback; None: loopback only, or refused
    security: SecuritySpec | Literal["insecure"] | None = None

    def host_named(self, name: str) -> HostSpec | None:
        return next((h for h in self.hosts if h.name == name), None)

    def address_of(self, host: str) -> str:
        """The address of a host given by name (from `hosts:`) or as a bare address."""
        spec = self.host_named(host)
        return spec.address if spec else host

    def broker_host(self) -> str:
        """The broker's host: its `host:`, or the host of its clients endpoint (named when `hosts:` has it)."""
        if self.broker.host:
            return self.broker.host
        return self.host_at(endpoint_host(self.broker.clients))

    def host_at(self, address: str) -> str:
        """The name of the host with this address, or the address itself when none is named so."""
        named = [h.name for h in self.hosts if h.address == address]
        return named[0] if len(named) == 1 else address

    def canonical_host(self, host: str) -> str:
        """A host as its name when `hosts:` names it (given by name or by its address), else as given."""
        return host if self.host_named(host) else self.host_at(host)

    def pipeline_version(self, pipeline: PipelineSpec) -> str:
        """What a pipeline's processes are made of, as a short digest: the model, the broker endpoint they
        report to, the pipeline with its hosts' addresses, and those hosts' keys. A redeploy keeps a pipeline whose version is
        unchanged and replaces one whose version differs; stages and the broker compare it on every message
        between them, so messages of another version are ignored."""
        resolved = msgspec.structs.replace(pipeline, stages=[
            msgspec.structs.replace(stage, ranks=[msgspec.structs.replace(r, host=self.address_of(r.host))
                                                  for r in stage.ranks])
            for stage in pipeline.stages])
        # the keys its processes hold or check: a key changed is a pipeline to restart
        hosts = {self.canonical_host(r.host) for stage in pipeline.stages for r in stage.ranks}
        hosts.add(self.canonical_host(self.broker_host()))
        keys = sorted((h.name, h.public_key) for h in self.hosts if h.name in hosts and h.public_key)
        material = msgspec.json.encode([self.model, self.broker.results, resolved, keys])
        return hashlib.sha256(material).hexdigest()[:16]

    def stage(self, stage_id: str) -> tuple[PipelineSpec, int]:
        """The pipeline holding `stage_id` and the stage's index in it."""
        for pipeline in self.pipelines:
            for index, stage in enumerate(pipeline.stages):
                if stage.id == stage_id:
                    return pipeline, index
        known = ", ".join(s.id for p in self.pipelines for s in p.stages)
        raise KeyError(f"no stage {stage_id!r} in the deployment (stages: {known})")

    def model_info(self) -> ModelInfo:
        return read_model_info(self.model.path)


def _msgspec_path(message: str) -> tuple[str, str]:
    """Split msgspec's 'problem - at `$.a[0].b`' into ('a[0].b', 'problem')."""
    match = re.search(r"^(.*) - at `\$(.*)`$", message)
    if not match:
        return "(root)", message
    return match.group(2).lstrip(".") or "(root)", match.group(1)


def _check_endpoint(value: str, path: str) -> None:
    match = ENDPOINT.match(value)
    if not match or not 0 < int(match.group("port")) < 65536:
        raise DeploymentError(path, f"{value!r} is not an endpoint of the form tcp://HOST:PORT")


def endpoint_host(endpoint: str) -> str:
    """The host part of tcp://HOST:PORT (an IPv6 address without its brackets)."""
    return endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    return host == "localhost" or (is_ip_address(host) and ipaddress.ip_address(host).is_loopback)


def same_address(a: str, b: str) -> bool:
    """Whether two hosts are the same place as far as an endpoint can tell (loopback spellings are one)."""
    return a == b or (is_loopback(a) and is_loopback(b))


def _bound_key(deployment: Deployment, host: str, endpoint: str) -> tuple[str, str]:
    """What no two bound endpoints may share: a loopback endpoint is one per host address (hosts elsewhere
    may bind the same), any other is one in all."""
    return (deployment.address_of(host) if is_loopback(endpoint_host(endpoint)) else "", endpoint)


def _check_hosts(deployment: Deployment) -> None:
    names: dict[str, int] = {}
    for h, host in enumerate(deployment.hosts):
        at = f"hosts[{h}]"
        if not HOSTNAME.match(host.name):
            raise DeploymentError(f"{at}.name", f"{host.name!r} is not a host name (letters, digits, - _ .)")
        if host.name in names:
            raise DeploymentError(f"{at}.name", f"duplicate host {host.name!r} (also hosts[{names[host.name]}])")
        names[host.name] = h
        if not (is_ip_address(host.address) or HOSTNAME.match(host.address)):
            raise DeploymentError(f"{at}.address", f"{host.address!r} is not an IP address or a DNS name")
        if host.public_key is not None and not Z85_KEY.fullmatch(host.public_key):
            raise DeploymentError(f"{at}.public_key", "a CurveZMQ public key is 40 characters of Z85")
    if deployment.broker.host is not None and deployment.broker.host not in names:
        raise DeploymentError("broker.host", f"unknown host {deployment.broker.host!r}{_known(deployment)}")
    security = deployment.security
    if isinstance(security, SecuritySpec):
        for k, key in enumerate(security.client_keys):
            if not Z85_KEY.fullmatch(key):
                raise DeploymentError(f"security.client_keys[{k}]", "a CurveZMQ public key is 40 characters of Z85")
        if security.client_keys_file is not None and not Path(security.client_keys_file).is_file():
            raise DeploymentError("security.client_keys_file", f"{security.client_keys_file} is not a readable file")


def _known(deployment: Deployment) -> str:
    return f" (hosts: {', '.join(h.name for h in deployment.hosts)})" if deployment.hosts else " (no hosts: section)"


def _check_host(deployment: Deployment, host: str, path: str) -> None:
    """A rank's host is a name from `hosts:` or a bare address; with a `hosts:` section, a word that is
    neither an IP address nor `localhost` must be one of its names (a typo is not taken for a DNS name)."""
    if deployment.host_named(host) or not deployment.hosts or is_ip_address(host) or host == "localhost":
        return
    raise DeploymentError(path, f"unknown host {host!r}{_known(deployment)}")


def _check_on_host(deployment: Deployment, endpoint: str, host: str, path: str) -> None:
    """An endpoint a process binds must be on that process's host (or a wildcard)."""
    bound = endpoint_host(endpoint)
    address = deployment.address_of(host)
    if bound in ("*", "0.0.0.0", "::") or same_address(bound, address):
        return
    if is_ip_address(bound) and (is_ip_address(address) or address == "localhost"):
        raise DeploymentError(path, f"{endpoint} is not on host {host} ({address}), where it is bound")


def parse_deployment(data: Any, base_dir: Path | None = None) -> Deployment:
    """Type-check a parsed YAML document; relative model paths are taken from `base_dir`."""
    if not isinstance(data, dict):
        raise DeploymentError("(root)", "the deployment file must be a mapping with model, broker, pipelines")
    try:
        deployment = msgspec.convert(data, Deployment, strict=False)
    except msgspec.ValidationError as exc:
        raise DeploymentError(*_msgspec_path(str(exc))) from None
    model_path = Path(deployment.model.path).expanduser()
    if base_dir is not None and not model_path.is_absolute():
        model_path = base_dir / model_path
        deployment = msgspec.structs.replace(
            deployment, model=msgspec.structs.replace(deployment.model, path=str(model_path))
        )
    security = deployment.security
    if base_dir is not None and isinstance(security, SecuritySpec) and security.client_keys_file \
            and not Path(security.client_keys_file).is_absolute():
        deployment = msgspec.structs.replace(deployment, security=msgspec.structs.replace(
            security, client_keys_file=str(base_dir / security.client_keys_file)))
    return deployment


def validate_layout(deployment: Deployment, info: ModelInfo | None) -> None:
    """Check what the schema cannot: uniqueness, layer coverage, TP degrees, devices, hosts and endpoints."""
    _check_hosts(deployment)
    _check_endpoint(deployment.broker.clients, "broker.clients")
    _check_endpoint(deployment.broker.results, "broker.results")
    if deployment.broker.host is not None:
        for field in ("clients", "results"):
            _check_on_host(deployment, getattr(deployment.broker, field), deployment.broker.host, f"broker.{field}")
    broker_host = deployment.broker_host()
    endpoints = {_bound_key(deployment, broker_host, deployment.broker.clients): "broker.clients"}
    if _bound_key(deployment, broker_host, deployment.broker.results) in endpoints:
        raise DeploymentError("broker.results", "same endpoint as broker.clients")
    endpoints[_bound_key(deployment, broker_host, deployment.broker.results)] = "broker.results"
    if not deployment.pipelines:
        raise DeploymentError("pipelines", "at least one pipeline is needed")
    ids: dict[str, str] = {}
    devices: dict[tuple[str, str], str] = {}
    end_layer = info.num_layers if info else None
    for p, pipeline in enumerate(deployment.pipelines):
        where = f"pipelines[{p}]"
        if pipeline.id in ids:
            raise DeploymentError(f"{where}.id", f"duplicate id {pipeline.id!r} (also {ids[pipeline.id]})")
        ids[pipeline.id] = f"{where}.id"
        if not pipeline.stages:
            raise DeploymentError(f"{where}.stages", "a pipeline needs at least one stage")
        next_layer = 0
        for s, stage in enumerate(pipeline.stages):
            at = f"{where}.stages[{s}]"
            if stage.id in ids:
                raise DeploymentError(f"{at}.id", f"duplicate id {stage.id!r} (also {ids[stage.id]})")
            ids[stage.id] = f"{at}.id"
            for field in ("inbound", "tp_init"):
                value = getattr(stage, field)
                _check_endpoint(value, f"{at}.{field}")
                key = _bound_key(deployment, stage.ranks[0].host if stage.ranks else "", value)
                if key in endpoints:
                    raise DeploymentError(f"{at}.{field}", f"endpoint {value} is also {endpoints[key]}")
                endpoints[key] = f"{at}.{field}"
            start, end = stage.layers
            if start != next_layer:
                problem = "overlaps the previous stage" if start < next_layer else "leaves a gap after the previous stage"
                raise DeploymentError(f"{at}.layers", f"[{start}, {end}) {problem} (expected to start at {next_layer})")
            if end <= start:
                raise DeploymentError(f"{at}.layers", f"[{start}, {end}) is empty; ranges are half-open [start, end)")
            if end_layer is not None and end > end_layer:
                raise DeploymentError(f"{at}.layers", f"[{start}, {end}) goes past the model's {end_layer} layers")
            next_layer = end
            if not stage.ranks:
                raise DeploymentError(f"{at}.ranks", "a stage needs at least one rank")
            for r, rank in enumerate(stage.ranks):
                _check_host(deployment, rank.host, f"{at}.ranks[{r}].host")
            hosts = {deployment.canonical_host(rank.host) for rank in stage.ranks}
            if len(hosts) > 1:
                raise DeploymentError(f"{at}.ranks", f"a TP group stays on one host, got {sorted(hosts)}")
            _check_on_host(deployment, stage.inbound, stage.ranks[0].host, f"{at}.inbound")
            for r, rank in enumerate(stage.ranks):
                if not DEVICE.match(rank.device):
                    raise DeploymentError(f"{at}.ranks[{r}].device", f"{rank.device!r} is not cpu or cuda:N")
                if rank.device.startswith("cuda"):
                    key = (deployment.canonical_host(rank.host), rank.device if ":" in rank.device else "cuda:0")
                    if key in devices:
                        raise DeploymentError(f"{at}.ranks[{r}]", f"{key[1]} on {key[0]} is also {devices[key]}")
                    devices[key] = f"{at}.ranks[{r}]"
            if info is not None and (why := info.check_tp_degree(stage.tp)):
                raise DeploymentError(f"{at}.ranks", why)
        if end_layer is None:
            end_layer = next_layer
        if next_layer != end_layer:
            raise DeploymentError(
                f"{where}.stages", f"layers end at {next_layer}, but the model has {end_layer} layers"
            )


def file_version(text: bytes) -> str:
    """A deployment file's version as every process names it: a digest of its bytes."""
    return hashlib.sha256(text).hexdigest()[:16]


def load_deployment(source: str | Path | dict, check_checkpoint: bool = True) -> Deployment:
    """Load and validate a deployment file (a path or an already parsed mapping).

    With `check_checkpoint`, the model directory must hold a supported safetensors checkpoint, and layer
    ranges and TP degrees are checked against its config; without it (a plan for machines elsewhere), only
    the layout's own consistency is checked.
    """
    if isinstance(source, dict):
        return _validated(parse_deployment(source, None), check_checkpoint)
    path = Path(source)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise DeploymentError("(file)", f"cannot read {path}: {exc.strerror}") from None
    return load_deployment_text(text, path, check_checkpoint)


def load_deployment_text(text: bytes | str, path: Path, check_checkpoint: bool = True) -> Deployment:
    """Load a deployment file's contents as read from `path` (relative model paths are taken from there):
    a process that watches the file validates exactly the bytes it compared."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeploymentError("(file)", f"{path} is not valid YAML: {exc}") from None
    return _validated(parse_deployment(data, path.parent), check_checkpoint)


def _validated(deployment: Deployment, check_checkpoint: bool) -> Deployment:
    info = None
    if check_checkpoint:
        try:
            info = deployment.model_info()
        except CheckpointError as exc:
            raise DeploymentError("model.path", str(exc)) from None
    validate_layout(deployment, info)
    return deployment


def dump_deployment(deployment: Deployment) -> str:
    """The deployment as YAML text (what `load_deployment` reads back)."""
    return yaml.safe_dump(msgspec.to_builtins(deployment), sort_keys=False)
