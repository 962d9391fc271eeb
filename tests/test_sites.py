"""tools/sites.py: emulated datacenters give real addresses, real latency and real bandwidth limits.

Timing assertions are lower bounds (the delay line and tbf can only add time), plus generous sanity upper
bounds. Every Sites here uses its own prefix and its own /20 of 10.241.0.0/16, away from the default subnet
that other tests may be using at the same time.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys

import pytest

from tools.sites import LinkCounter, Sites, Topology, remove_prefix, tbf_burst_bytes, unavailable_reason

LATENCY_MS = 25.0
SPEC = {
    "regions": {"eu": ["a", "b"], "us": ["c"], "ap": ["d"]},
    "links": [
        {"a": "eu", "b": "us", "mbit": 200, "latency_ms": LATENCY_MS},
        {"a": "us", "b": "ap", "mbit": 100, "latency_ms": 5},
    ],
}

needs_root = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
pytestmark = pytest.mark.timeout(60)

# A TCP server: binds ADDRESS on a free port, prints the port, echoes every connection until its peer closes.
SERVER = r"""
import socket, sys, threading
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(1 << 20):
            conn.sendall(data)
while True:
    threading.Thread(target=echo, args=(server.accept()[0],), daemon=True).start()
"""

# A TCP client: N one-byte round trips to ADDRESS:PORT, then BULK bytes echoed back; prints JSON timings.
CLIENT = r"""
import json, socket, sys, time
address, port, n, bulk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
conn = socket.create_connection((address, port), timeout=10)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(n):
    start = time.perf_counter()
    conn.sendall(b"x")
    assert conn.recv(1) == b"x"
    rtts.append(time.perf_counter() - start)
start, got = time.perf_counter(), 0
if bulk:
    conn.sendall(b"y" * bulk)
    while got < bulk:
        got += len(conn.recv(1 << 20))
print(json.dumps({"rtts": rtts, "bulk_s": time.perf_counter() - start, "echoed": got}))
"""

# A one-way sink: reads until EOF, then answers with the byte count.
SINK = r"""
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn = server.accept()[0]
n = 0
while data := conn.recv(1 << 20):
    n += len(data)
conn.sendall(str(n).encode())
"""

SENDER = r"""
import json, socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
start = time.perf_counter()
conn.sendall(b"z" * int(sys.argv[3]))
conn.shutdown(socket.SHUT_WR)
received = int(conn.recv(64))
print(json.dumps({"seconds": time.perf_counter() - start, "received": received}))
"""


def start_server(sites: Sites, host: str, script: str = SERVER, address: str | None = None,
                 timeout: float = 10.0) -> tuple[subprocess.Popen, int]:
    """Start a server script in a host, bound to its address; return it and the port it printed."""
    process = sites.popen(host, [sys.executable, "-c", script, address or sites.address(host)],
                          stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, f"server in {host} did not start within {timeout} s"
    return process, int(process.stdout.readline())


def client(sites: Sites, host: str, address: str, port: int, n: int = 20, bulk: int = 0) -> dict:
    """Run the echo client in a host against address:port and return its timings."""
    result = sites.run(host, [sys.executable, "-c", CLIENT, address, str(port), str(n), str(bulk)], timeout=30)
    return json.loads(result.stdout)


def leftovers(prefix: str) -> list[str]:
    """Namespaces and links with this prefix that still exist."""
    names = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    namespaces = [e["name"] for e in json.loads(names or "[]") if e["name"].startswith(prefix + "-")]
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    return namespaces + [e["ifname"] for e in json.loads(links) if e["ifname"].startswith(prefix + "-")]


def routed(subnet: str) -> bool:
    return bool(subprocess.run(["ip", "route", "show", subnet], capture_output=True, text=True,
                               timeout=10).stdout.strip())


@pytest.fixture(scope="module")
def sites():
    if unavailable_reason() is not None:
        pytest.skip(str(unavailable_reason()))
    with Sites(SPEC, prefix="hxts", subnet="10.241.0.0/20") as built:
        yield built


@pytest.fixture(scope="module")
def servers(sites: Sites) -> dict[str, int]:
    """An echo server on every host, by host name -> port."""
    return {host: start_server(sites, host)[1] for host in sites.hosts}


# ------------------------------------------------------------------------------------------ no root needed
def test_topology_is_validated() -> None:
    with pytest.raises(ValueError, match="unknown region"):
        Topology.from_spec({"regions": {"eu": ["a"]}, "links": [{"a": "eu", "b": "mars"}]})
    with pytest.raises(ValueError, match="appears twice"):
        Topology.from_spec({"regions": {"eu": ["a"], "us": ["a"]}})
    with pytest.raises(ValueError, match="no hosts"):
        Topology.from_spec({"regions": {"eu": []}})
    with pytest.raises(ValueError, match="prefix"):
        Sites(SPEC, prefix="a-much-too-long-prefix")
    with pytest.raises(ValueError, match="subnet"):
        Sites(SPEC, subnet="10.241.0.0/23")
    layout = Sites(SPEC, prefix="hxts", subnet="10.241.0.0/20")
    assert layout.address("a") == "10.241.1.10" and layout.address("b") == "10.241.1.11"
    assert layout.address("c") == "10.241.2.10" and layout.namespace("c") == "hxts-c"


# ------------------------------------------------------------------------------------------ one set of sites
@needs_root
def test_cross_region_round_trip_pays_twice_the_latency(sites: Sites, servers: dict[str, int]) -> None:
    rtts = client(sites, "a", sites.address("c"), servers["c"])["rtts"]
    assert min(rtts) >= 2 * LATENCY_MS / 1000
    assert sorted(rtts)[len(rtts) // 2] < 2 * LATENCY_MS / 1000 + 0.5  # sanity only


@needs_root
def test_same_region_has_no_added_delay(sites: Sites, servers: dict[str, int]) -> None:
    rtts = client(sites, "a", sites.address("b"), servers["b"])["rtts"]
    assert min(rtts) < 0.005


@needs_root
def test_link_counters_count_what_crosses_and_only_that(sites: Sites, servers: dict[str, int]) -> None:
    bulk = 1_000_000
    before = sites.link_counters()
    assert set(before) == {("eu", "us"), ("us", "eu"), ("us", "ap"), ("ap", "us")}
    assert client(sites, "a", sites.address("c"), servers["c"], n=1, bulk=bulk)["echoed"] == bulk
    crossed = sites.link_counters()
    assert crossed["eu", "us"].bytes - before["eu", "us"].bytes >= bulk
    assert crossed["us", "eu"].bytes - before["us", "eu"].bytes >= bulk  # the echo came back
    assert crossed["us", "ap"] == before["us", "ap"]
    client(sites, "a", sites.address("b"), servers["b"], n=1, bulk=bulk)  # inside eu: crosses nothing
    after = sites.link_counters()
    assert after["eu", "us"].bytes - crossed["eu", "us"].bytes < 10_000
    assert isinstance(after["eu", "us"], LinkCounter)


@needs_root
def test_the_calling_namespace_reaches_every_host(sites: Sites, servers: dict[str, int]) -> None:
    for host in sites.hosts:
        with socket.create_connection((sites.address(host), servers[host]), timeout=5) as conn:
            conn.settimeout(5)
            conn.sendall(host.encode())
            assert conn.recv(16) == host.encode()


@needs_root
def test_regions_without_a_link_cannot_reach_each_other(sites: Sites, servers: dict[str, int]) -> None:
    attempt = sites.run("a", [sys.executable, "-c", CLIENT, sites.address("d"), str(servers["d"]), "1", "0"],
                        timeout=20, check=False)
    assert attempt.returncode != 0 and "No route to host" in attempt.stderr
    assert client(sites, "c", sites.address("d"), servers["d"], n=1)["rtts"]  # d is reachable over its link


@needs_root
def test_a_host_binds_its_address_and_loopback_only(sites: Sites) -> None:
    probe = r"""
import errno, socket, sys
for address in (sys.argv[1], "127.0.0.1"):
    server = socket.create_server((address, 0))
    with socket.create_connection(server.getsockname(), timeout=5) as conn, server.accept()[0] as peer:
        conn.sendall(b"ok")
        assert peer.recv(2) == b"ok"
try:
    socket.create_server((sys.argv[2], 0))  # another host's address is not ours
    print("bound a foreign address")
except OSError as e:
    assert e.errno == errno.EADDRNOTAVAIL, e
try:
    socket.create_connection(("192.0.2.1", 80), timeout=5)  # TEST-NET: there is no route off the machine
    print("reached outside")
except OSError as e:
    assert e.errno == errno.ENETUNREACH, e
print("done")
"""
    result = sites.run("a", [sys.executable, "-c", probe, sites.address("a"), sites.address("b")], timeout=20)
    assert result.stdout.split() == ["done"]


@needs_root
def test_an_isolated_host_is_unreachable_until_reconnected(sites: Sites, servers: dict[str, int]) -> None:
    sites.isolate_host("b")
    try:
        with pytest.raises(OSError):
            socket.create_connection((sites.address("b"), servers["b"]), timeout=1).close()
    finally:
        sites.isolate_host("b", isolated=False)
    assert client(sites, "a", sites.address("b"), servers["b"], n=1)["rtts"]


# ------------------------------------------------------------------------------------------ their own sites
@needs_root
def test_bulk_transfer_is_held_to_the_link_rate() -> None:
    mbit, size = 20.0, 2_500_000
    spec = {"regions": {"eu": ["a"], "us": ["b"]}, "links": [{"a": "eu", "b": "us", "mbit": mbit, "latency_ms": 2}]}
    with Sites(spec, prefix="hxtb", subnet="10.241.16.0/20") as sites:
        _, port = start_server(sites, "b", SINK)
        result = sites.run("a", [sys.executable, "-c", SENDER, sites.address("b"), str(port), str(size)],
                           timeout=30)
        timing = json.loads(result.stdout)
        assert timing["received"] == size
        assert timing["seconds"] >= (size - tbf_burst_bytes(mbit)) * 8 / (mbit * 1e6)
        assert timing["seconds"] < 10 * size * 8 / (mbit * 1e6)  # sanity only
        assert sites.link_counters()["eu", "us"].bytes >= size


@needs_root
def test_kill_host_kills_every_process_in_it() -> None:
    spec = {"regions": {"eu": ["a", "b"]}}
    with Sites(spec, prefix="hxtk", subnet="10.241.32.0/20") as sites:
        sleepers = [sites.popen("a", ["sleep", "60"]) for _ in range(2)]
        bystander = sites.popen("b", ["sleep", "60"])
        killed = sites.kill_host("a")
        assert sorted(killed) == sorted(p.pid for p in sleepers)
        assert [p.wait(timeout=5) for p in sleepers] == [-9, -9]
        assert bystander.poll() is None
        assert sites.run("a", ["true"]).returncode == 0  # the host itself is still there, empty


@needs_root
def test_everything_is_removed_after_an_error_and_a_stale_set_before_a_build() -> None:
    spec = {"regions": {"eu": ["a"], "us": ["b"]}, "links": [{"a": "eu", "b": "us", "latency_ms": 1}]}
    subnet = "10.241.48.0/20"
    crashed = Sites(spec, prefix="hxtc", subnet=subnet)
    crashed.up()  # and never taken down, as if its test process had died
    stale = crashed.popen("a", ["sleep", "60"])
    assert leftovers("hxtc") and routed(subnet)
    with pytest.raises(RuntimeError, match="boom"):
        with Sites(spec, prefix="hxtc", subnet=subnet) as sites:
            assert stale.wait(timeout=5) == -9  # the rebuild removed the stale set, processes included
            survivor = sites.popen("b", ["sleep", "60"])
            raise RuntimeError("boom")
    assert survivor.wait(timeout=5) == -9
    assert leftovers("hxtc") == [] and not routed(subnet)
    remove_prefix("hxtc")  # idempotent on nothing
    crashed.down()


@needs_root
def test_a_failed_build_removes_what_it_made(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise RuntimeError("injected")

    sites = Sites(SPEC, prefix="hxtf", subnet="10.241.64.0/20")
    monkeypatch.setattr(sites, "_build_links", fail)
    with pytest.raises(RuntimeError, match="injected"):
        sites.up()
    assert leftovers("hxtf") == [] and not routed("10.241.64.0/20")
