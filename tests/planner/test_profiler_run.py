"""The profiler itself (needs torch): it times the stage's own code on a tiny checkpoint and writes a profile
that loads; the link probe measures a loopback link."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")

from hexgen_zmq.cli import main  # noqa: E402
from hexgen_zmq.planner.profile import load_profile  # noqa: E402
from hexgen_zmq.operations.profiler import _ProbeHandler, _ProbeServer, probe_link  # noqa: E402


def test_profile_of_a_tiny_checkpoint(tmp_path):
    from hexgen_zmq.model.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "p.yaml"
    assert main(["profile", "--config", str(model), "--out", str(out), "--host", "me", "--layers", "1",
                 "--prompt-lens", "8,32", "--batches", "1,4", "--contexts", "16,32", "--repeats", "2"]) == 0
    profile = load_profile(out)
    assert profile.host == "me" and profile.device.kind == "cpu" and profile.model.hidden_size == 256
    assert [p.prompt_len for p in profile.prefill] == [8, 32]
    assert {(p.batch, p.context) for p in profile.decode} == {(1, 16), (4, 16), (1, 32), (4, 32)}
    assert all(p.layer_s > 0 for p in profile.decode) and profile.stage_overhead_s > 0


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert main(["profile", "--config", "x", "--out", str(tmp_path / "p"), "--batches", "a"]) == 2
    assert "--batches" in capsys.readouterr().err


def test_link_probe_on_loopback():
    server = _ProbeServer(("127.0.0.1", 0), _ProbeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        gbps, latency_ms = probe_link("127.0.0.1", server.server_address[1], nbytes=1 << 20, pings=5, bulks=2)
        assert gbps > 0.1 and 0 <= latency_ms < 50
    finally:
        server.shutdown()
        server.server_close()
