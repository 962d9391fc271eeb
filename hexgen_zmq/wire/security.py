"""Who may talk to whom: CurveZMQ keys, which peers each bound socket admits, and which messages each role
may send.

Every socket bound on an address other than loopback is a CURVE server whose ZAP handler admits only the
public keys that the deployment file places at the other end of that socket; every socket that connects to
such an endpoint is a CURVE client with its host's key pair. Keys are per host (`hosts[].public_key`), so
a role is a host's: a stage takes Submit and Cancel only from the broker's host, micro-batches only from
the previous stage's host, feedback only from its pipeline's last stage's host. Loopback stays plain.

The policy (`allowed_peers`, `allowed_messages`, `security_problem`) is plain Python; `ProcessSecurity` applies
it to one process's sockets with pyzmq's own authenticator.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from hexgen_zmq.operations.deployment import Deployment, endpoint_host, is_loopback

log = logging.getLogger("security")

BROKER_CLIENTS, BROKER_RESULTS = "broker.clients", "broker.results"
FROM_BROKER = frozenset({"Submit", "Cancel", "BrokerEpoch"})
STAGE_TO_BROKER = frozenset({"Tokens", "Heartbeat", "StageReady", "StageFailed"})
SUPERVISOR_TO_BROKER = frozenset({"HostReport"})
CLIENT_TO_BROKER = frozenset({"GenerateRequest", "CancelRequest", "Ping", "StatusRequest"})


class SecurityError(RuntimeError):
    """Keys missing, unreadable or exposed, or a deployment that would run in the clear without saying so."""


def stage_domain(stage_id: str) -> str:
    return f"stage:{stage_id}"


# ------------------------------------------------------------------------------------------- policy


def off_loopback(deployment: Deployment) -> list[tuple[str, str]]:
    """Every bound endpoint that is not on loopback, as (field path, endpoint)."""
    found = [(f"broker.{f}", getattr(deployment.broker, f)) for f in ("clients", "results")]
    for p, pipeline in enumerate(deployment.pipelines):
        for s, stage in enumerate(pipeline.stages):
            found.append((f"pipelines[{p}].stages[{s}].inbound", stage.inbound))
    return [(path, e) for path, e in found if not is_loopback(endpoint_host(e))]


def security_mode(deployment: Deployment) -> str:
    """"curve", "insecure", or "none" (no `security:` at all)."""
    security = deployment.security
    if security is None:
        return "none"
    return security if isinstance(security, str) else security.mode


def security_problem(deployment: Deployment) -> str | None:
    """Why this deployment must not start (secure by default), or None. A deployment on loopback only runs
    plain; one with any other endpoint needs keys for every host, unless it says `security: insecure`."""
    exposed = off_loopback(deployment)
    mode = security_mode(deployment)
    if not exposed or mode == "insecure":
        return None
    if mode == "none":
        path, endpoint = exposed[0]
        return (f"security: {path} ({endpoint}) is not on loopback, and the file has no keys: give every host a "
                f"public_key under hosts: (hexgen-zmq keys NAME --out DIR) and set security: {{mode: curve}}, or "
                f"say security: insecure to run in the clear")
    missing = [h.name for h in deployment.hosts if not h.public_key]
    if not deployment.hosts or missing:
        return f"security: mode curve needs a public_key for every host (missing: {', '.join(missing) or 'no hosts: section'})"
    return None


def host_key(deployment: Deployment, host: str) -> str | None:
    spec = deployment.host_named(deployment.canonical_host(host))
    return spec.public_key if spec else None


def client_keys(deployment: Deployment) -> set[str]:
    security = deployment.security
    if security is None or isinstance(security, str):
        return set()
    keys = set(security.client_keys)
    if security.client_keys_file:
        for line in Path(security.client_keys_file).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                keys.add(line.strip())
    return keys


def allowed_peers(deployment: Deployment, domain: str) -> set[str]:
    """The public keys a bound socket admits: the broker's clients socket, clients' keys and every host's
    (supervisors ask for status there); its results socket, every host's (stages and supervisors); a
    stage's inbound, the broker's host, the previous stage's and (first stage) the last stage's."""
    hosts = {h.public_key for h in deployment.hosts if h.public_key}
    if domain == BROKER_CLIENTS:
        return client_keys(deployment) | hosts
    if domain == BROKER_RESULTS:
        return hosts
    return {key for key, _ in _stage_senders(deployment, domain) if key}


def _stage_senders(deployment: Deployment, domain: str) -> list[tuple[str | None, frozenset[str]]]:
    stage_id = domain.removeprefix("stage:")
    try:
        pipeline, index = deployment.stage(stage_id)
    except KeyError:
        return []
    senders = [(host_key(deployment, deployment.broker_host()), FROM_BROKER)]
    if index > 0:
        senders.append((host_key(deployment, pipeline.stages[index - 1].ranks[0].host), frozenset({"MicroBatch"})))
    if index == 0 and len(pipeline.stages) > 1:
        senders.append((host_key(deployment, pipeline.stages[-1].ranks[0].host), frozenset({"Feedback"})))
    return senders


def allowed_messages(deployment: Deployment, domain: str, sender: str) -> frozenset[str]:
    """The message kinds an authenticated sender may send to that socket (its roles' union: a host that holds
    the broker and the previous stage may send both kinds)."""
    hosts = {h.public_key for h in deployment.hosts if h.public_key}
    if domain == BROKER_CLIENTS:
        return CLIENT_TO_BROKER if sender in client_keys(deployment) else frozenset({"StatusRequest", "Ping"}) \
            if sender in hosts else frozenset()
    if domain == BROKER_RESULTS:
        return STAGE_TO_BROKER | SUPERVISOR_TO_BROKER if sender in hosts else frozenset()
    kinds: set[str] = set()
    for key, allowed in _stage_senders(deployment, domain):
        if key == sender:
            kinds |= allowed
    return frozenset(kinds)


def claimed_keys(deployment: Deployment, message) -> set[str]:
    """The host keys a report may come from: its stage's host (Tokens: its pipeline's last stage's), or the
    supervisor's own host. Empty for a stage or host the file does not know."""
    stage_id = getattr(message, "stage_id", None)
    if stage_id is None and hasattr(message, "pipeline_id"):
        pipeline = next((p for p in deployment.pipelines if p.id == message.pipeline_id), None)
        stage_id = pipeline.stages[-1].id if pipeline else None
    if stage_id is not None:
        try:
            pipeline, index = deployment.stage(stage_id)
        except KeyError:
            return set()
        key = host_key(deployment, pipeline.stages[index].ranks[0].host)
        return {key} if key else set()
    if hasattr(message, "host") and hasattr(message, "processes"):
        key = host_key(deployment, message.host)
        return {key} if key else set()
    return set()


# ------------------------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # z85
    secret: bytes  # z85


def write_keys(name: str, directory: Path) -> tuple[Path, Path]:
    """A new key pair as pyzmq certificate files DIR/NAME.key and DIR/NAME.key_secret (owner-only)."""
    directory.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


def load_secret(path: Path) -> KeyPair:
    """A key pair from a secret certificate file that only its owner may read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecurityError(f"cannot read the secret key {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecurityError(f"{path} is readable by others (mode {stat.S_IMODE(mode):o}): chmod 600 it")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise SecurityError(f"{path} holds no secret key")
    return KeyPair(public, secret)


def load_host_keys(keys_dir: Path, host: str) -> KeyPair:
    return load_secret(keys_dir / f"{host}.key_secret")


class ClientCurve:
    """A client's CURVE settings: its own key pair (a secret certificate file) and the broker host's public
    key, applied to the socket before it connects (to what `make_socket` calls a security)."""

    def __init__(self, secret_file: str | Path, server_key: str):
        self.keys = load_secret(Path(secret_file))
        if not isinstance(server_key, str) or len(server_key) != 40:
            raise SecurityError("server_key must be the broker host's public key: 40 characters of Z85")
        self.server_key = server_key.encode()

    def client(self, sock: zmq.Socket, endpoint: str) -> None:
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = self.server_key


HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the broker refused this client's key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed (a client without keys meeting a CURVE broker, "
                                         "keys meeting a plain one, or the wrong server_key)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed",
}


# ------------------------------------------------------------------------------------------- a process


class ProcessSecurity:
    """One process's side: its host's key pair, a ZAP handler (pyzmq's authenticator, on a thread of its own
    so that a busy event loop never delays a handshake) admitting per socket the keys `allowed_peers` names,
    and per-message role checks with rejections counted per peer and reason."""

    def __init__(self, deployment: Deployment, host: str | None, keys_dir: str | Path | None,
                 ctx: zmq.Context | None = None):
        self.deployment = deployment
        self.enabled = security_mode(deployment) == "curve" and bool(off_loopback(deployment))
        self.keys: KeyPair | None = None
        self.previous: Deployment | None = None
        self.rejected: Counter[tuple[str, str]] = Counter()
        self.auth: ThreadAuthenticator | None = None
        if problem := security_problem(deployment):
            raise SecurityError(problem)
        if security_mode(deployment) == "insecure" and off_loopback(deployment):
            log.warning("security: insecure: traffic between hosts is neither encrypted nor authenticated")
        if not self.enabled:
            return
        if keys_dir is None:
            raise SecurityError("this deployment uses CURVE keys: pass --keys DIR (with HOST.key_secret in it)")
        name = deployment.canonical_host(host) if host else None
        if name is None or deployment.host_named(name) is None:
            raise SecurityError(f"cannot tell this process's host ({host!r}) among hosts: to pick its key")
        self.keys = load_host_keys(Path(keys_dir), name)
        expected = deployment.host_named(name).public_key
        if self.keys.public.decode() != expected:
            raise SecurityError(f"{keys_dir}/{name}.key_secret does not match hosts[{name}].public_key")
        if ctx is not None:
            self.start(ctx)

    def start(self, ctx: zmq.Context) -> None:
        """The ZAP handler for every CURVE server socket of `ctx` (a shadow shares the context's ZAP endpoint)."""
        if not self.enabled or self.auth is not None:
            return
        sync = zmq.Context.shadow(ctx.underlying)
        self.auth = ThreadAuthenticator(sync, log=logging.getLogger("security.zap"))
        self.auth.start()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit `key` on the socket of `domain` when the deployment places it at the other end."""
        z85 = key.decode("ascii", "replace")
        if z85 in allowed_peers(self.deployment, domain):
            return True
        self.rejected[(z85[:8], f"unknown key on {domain}")] += 1
        log.warning("refused a CURVE handshake on %s from key %s", domain, z85)
        return False

    def update(self, deployment: Deployment) -> None:
        """A redeployed file: its keys count for new connections (a removed key is no longer admitted). The
        previous version still names the hosts of pipelines that are finishing their requests."""
        self.previous, self.deployment = self.deployment, deployment

    def sent_by_its_host(self, frame, message) -> bool:
        """Whether a stage's or supervisor's report comes from the host the file places that stage or
        supervisor on: a host may not speak for another one's stages. True on plain sockets."""
        sender = self._sender(frame)
        if sender is None:
            return True
        ok = any(sender in claimed_keys(d, message) for d in (self.deployment, self.previous) if d is not None)
        if not ok:
            self.rejected[(sender[:8], f"{type(message).__name__} for another host")] += 1
            log.warning("refused %s from %s: it speaks for another host", type(message).__name__, sender)
        return ok

    def _sender(self, frame) -> str | None:
        if not self.enabled:
            return None
        try:
            return frame.get("User-Id") or None
        except (zmq.ZMQError, AttributeError):
            return None

    def server(self, sock: zmq.Socket, endpoint: str, domain: str) -> None:
        """Make `sock` a CURVE server before it binds `endpoint`, unless that is loopback."""
        if self.enabled and not is_loopback(endpoint_host(endpoint)):
            sock.curve_secretkey = self.keys.secret
            sock.curve_publickey = self.keys.public
            sock.curve_server = True
            sock.zap_domain = domain.encode()
            # pyzmq looks providers up by the exact domain ("*" is only for sockets that set none)
            self.auth.configure_curve_callback(domain, self)

    def client(self, sock: zmq.Socket, endpoint: str) -> None:
        """Make `sock` a CURVE client of the host at `endpoint` before it connects, unless that is loopback."""
        if not self.enabled or is_loopback(endpoint_host(endpoint)):
            return
        address = endpoint_host(endpoint)
        server = next((h.public_key for h in self.deployment.hosts if h.address == address and h.public_key), None)
        if server is None:
            raise SecurityError(f"no host with a public_key has address {address} (for {endpoint})")
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_serverkey = server.encode()

    def admits(self, domain: str, frame, kind: str) -> bool:
        """Whether the authenticated sender of `frame` (its ZAP User-Id) may send `kind` to this socket;
        always true for a plain (loopback) socket. A refusal is counted per peer and reason."""
        sender = self._sender(frame)
        if sender is None:  # a plain socket (loopback): not from another host
            return True
        if kind in allowed_messages(self.deployment, domain, sender):
            return True
        self.rejected[(sender[:8], f"{kind} on {domain}")] += 1
        log.warning("refused %s on %s from %s: not its role", kind, domain, sender)
        return False

    def rejections(self) -> dict[str, int]:
        return {f"{peer}: {reason}": n for (peer, reason), n in self.rejected.items()}

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
