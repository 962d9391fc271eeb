"""Who may talk to whom, without processes: secure by default, the keys each socket admits, the messages
each role may send, and key files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hexgen_zmq.operations.deployment import load_deployment
from hexgen_zmq.wire.messages import Heartbeat, HostReport, Tokens
from hexgen_zmq.wire.security import (BROKER_CLIENTS, BROKER_RESULTS, ProcessSecurity, SecurityError, allowed_messages,
                                 allowed_peers, claimed_keys, load_secret, security_problem, stage_domain, write_keys)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    found = {}
    for name in ("a", "b", "c", "client"):
        public, _ = write_keys(name, directory)
        found[name] = public.read_text().split('public-key = "')[1].split('"')[0]
    return directory, found


def three_hosts(keys: dict | None, security="curve") -> dict:
    hosts = [{"name": n, "address": f"10.9.0.{i + 2}"} for i, n in enumerate("abc")]
    if keys:
        for host in hosts:
            host["public_key"] = keys[host["name"]]
    spec = {
        "model": {"path": "/nowhere"},
        "hosts": hosts,
        "broker": {"host": "a", "clients": "tcp://10.9.0.2:5555", "results": "tcp://10.9.0.2:5556"},
        "pipelines": [{"id": "p0", "stages": [
            {"id": "p0s0", "layers": [0, 3], "inbound": "tcp://10.9.0.3:7000", "tp_init": "tcp://127.0.0.1:7500",
             "ranks": [{"host": "b"}]},
            {"id": "p0s1", "layers": [3, 6], "inbound": "tcp://10.9.0.4:7000", "tp_init": "tcp://127.0.0.1:7500",
             "ranks": [{"host": "c"}]}]}],
    }
    if security == "curve":
        spec["security"] = {"mode": "curve", "client_keys": [keys["client"]] if keys else []}
    elif security is not None:
        spec["security"] = security
    return spec


def test_off_loopback_without_keys_refuses_to_start_unless_it_says_insecure(keys):
    problem = security_problem(load_deployment(three_hosts(None, security=None), check_checkpoint=False))
    assert "broker.clients" in problem and "security: insecure" in problem and "hexgen-zmq keys" in problem
    missing = security_problem(load_deployment(three_hosts(None), check_checkpoint=False))
    assert "public_key" in missing and "a, b, c" in missing
    assert security_problem(load_deployment(three_hosts(None, security="insecure"), check_checkpoint=False)) is None
    assert security_problem(load_deployment(three_hosts(keys[1]), check_checkpoint=False)) is None


def test_each_socket_admits_only_the_keys_at_its_other_end(keys):
    k = keys[1]
    deployment = load_deployment(three_hosts(k), check_checkpoint=False)
    assert allowed_peers(deployment, BROKER_CLIENTS) == {k["client"], k["a"], k["b"], k["c"]}
    assert allowed_peers(deployment, BROKER_RESULTS) == {k["a"], k["b"], k["c"]}
    assert allowed_peers(deployment, stage_domain("p0s0")) == {k["a"], k["c"]}  # the broker, the last stage
    assert allowed_peers(deployment, stage_domain("p0s1")) == {k["a"], k["b"]}  # the broker, the previous stage


def test_a_peer_may_send_only_what_its_role_sends(keys):
    k = keys[1]
    deployment = load_deployment(three_hosts(k), check_checkpoint=False)
    assert allowed_messages(deployment, stage_domain("p0s1"), k["b"]) == {"MicroBatch"}
    assert allowed_messages(deployment, stage_domain("p0s0"), k["c"]) == {"Feedback"}
    assert allowed_messages(deployment, stage_domain("p0s0"), k["a"]) == {"Submit", "Cancel", "BrokerEpoch"}
    assert "Tokens" not in allowed_messages(deployment, BROKER_CLIENTS, k["client"])
    assert "GenerateRequest" not in allowed_messages(deployment, BROKER_CLIENTS, k["b"])  # a host asks status only
    assert allowed_messages(deployment, BROKER_RESULTS, k["client"]) == frozenset()
    # a host may speak only for its own stages and its own supervisor
    assert claimed_keys(deployment, Heartbeat("p0s1")) == {k["c"]}
    assert claimed_keys(deployment, Tokens("p0", [])) == {k["c"]}  # the last stage samples
    assert claimed_keys(deployment, HostReport("b", 1)) == {k["b"]}


def test_key_files_are_owner_only_and_must_match_the_file(keys, tmp_path):
    directory, k = keys
    assert oct(os.stat(directory / "a.key_secret").st_mode & 0o777) == "0o600"
    exposed = tmp_path / "exposed.key_secret"
    exposed.write_bytes((directory / "a.key_secret").read_bytes())
    os.chmod(exposed, 0o644)
    with pytest.raises(SecurityError, match="readable by others"):
        load_secret(exposed)
    deployment = load_deployment(three_hosts(k), check_checkpoint=False)
    assert ProcessSecurity(deployment, "b", directory).keys.public.decode() == k["b"]
    with pytest.raises(SecurityError, match="--keys"):
        ProcessSecurity(deployment, "b", None)
    swapped = load_deployment(three_hosts({**k, "b": k["c"]}), check_checkpoint=False)
    with pytest.raises(SecurityError, match="does not match"):
        ProcessSecurity(swapped, "b", directory)


def test_the_keys_command_writes_pyzmq_certificates(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "keys", "host1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "host1.key").exists() and (tmp_path / "host1.key_secret").stat().st_mode & 0o077 == 0
    pair = load_secret(tmp_path / "host1.key_secret")
    assert pair.public.decode() in result.stdout and len(pair.secret) == 40


def test_up_refuses_a_deployment_off_loopback_without_keys(tmp_path, tiny_model):
    import yaml

    spec = three_hosts(None, security=None)
    spec["model"]["path"] = str(tiny_model)
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = subprocess.run([sys.executable, "-m", "hexgen_zmq.cli", "up", str(path), "--host", "a"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "not on loopback" in result.stderr and "security: insecure" in result.stderr


def test_up_http_gives_its_gateway_a_client_key_where_the_broker_is_a_curve_server(keys):
    """`up --http` starts a gateway, a client of the broker: off loopback under CURVE it needs a key from
    security.client_keys (a host's key may only ask for status), so `up` refuses without one and passes
    one on to `serve --keys`."""
    from hexgen_zmq.cli import build_parser
    from hexgen_zmq.operations.commands import gateway_key_problem, serve_options

    deployment = load_deployment(three_hosts(keys[1]), check_checkpoint=False)
    problem = gateway_key_problem(deployment, None)
    assert "--gateway-keys" in problem and "security.client_keys" in problem and "tcp://10.9.0.2:5555" in problem
    assert gateway_key_problem(deployment, str(keys[0])) is None
    assert gateway_key_problem(load_deployment(three_hosts(None, security="insecure"), check_checkpoint=False),
                               None) is None
    args = build_parser().parse_args(["up", "d.yaml", "--keys", "host-keys", "--http", "127.0.0.1:8000",
                                      "--gateway-keys", "gw.key_secret"])
    again = build_parser().parse_args(["serve", "--config", "d.yaml", *serve_options(args)])
    assert again.keys == "gw.key_secret"
    plain = build_parser().parse_args(["up", "d.yaml", "--http", "127.0.0.1:8000"])
    assert "--keys" not in serve_options(plain)


@pytest.mark.parametrize("credentials", ["none", "wrong server key"])
def test_a_refused_handshake_fails_the_request_even_when_the_client_is_slow_to_watch(keys, credentials,
                                                                                     monkeypatch):
    """libzmq does not retry a handshake refused on protocol: its one event must not be missed, even when
    the client's thread is held up (a loaded machine) between making its socket and watching it."""
    import asyncio
    import time

    import zmq
    import zmq.sugar.socket

    from hexgen_zmq.serving.client import Client, GenerationError

    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    server.curve_publickey, server.curve_secretkey = zmq.curve_keypair()
    server.curve_server = True
    port = server.bind_to_random_port("tcp://127.0.0.1")
    attach = zmq.sugar.socket.Socket.get_monitor_socket

    def held_up(sock, *args, **kwargs):
        time.sleep(0.5)  # long enough for a loopback handshake to fail, were the socket connected already
        return attach(sock, *args, **kwargs)

    monkeypatch.setattr(zmq.sugar.socket.Socket, "get_monitor_socket", held_up)
    options = {} if credentials == "none" else {"keys": str(keys[0] / "client.key_secret"),
                                                "server_key": keys[1]["a"]}

    async def attempt() -> GenerationError:
        async with await Client.connect(f"tcp://127.0.0.1:{port}", **options) as client:
            with pytest.raises(GenerationError) as err:
                await asyncio.wait_for(client.generate(prompt_ids=[1, 2, 3], max_new_tokens=4), 10)
            return err.value

    try:
        error = asyncio.run(attempt())
    finally:
        server.close(0)
        ctx.term()
    assert error.code == "unauthenticated" and "CURVE" in str(error), error
