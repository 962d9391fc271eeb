"""`hexgen-zmq profile`: measure this host for the planner, with the stage's own execution code.

The planner's cost model is only as good as its coefficients; this measures them where the deployment will
run. A few decoder layers of the checkpoint are loaded as one stage (`StageModel`, the layer code every
stage runs) and driven through `StageWorker.step`, the function a stage calls per micro-batch: prompts of a
few lengths alone (prefill, per token), and decode steps of a few batch sizes at a few context lengths. Each
layer's and the head's forward is timed inside the step; what the step takes beyond them (cache
bookkeeping, the attention layout, sampling) plus encoding and decoding the micro-batch for the wire is the
stage's fixed per-step overhead. Between hosts, `--peer NAME=HOST:PORT` measures each link's one-way
latency (half the median round trip of a small message) and goodput (a bulk transfer) against
`hexgen-zmq profile --serve-probe --listen HOST:PORT` running on the peer. The profile file's schema is in
`hexgen_zmq.planner.profile`; a cluster description references it per host (`profile: PATH`).

    hexgen-zmq profile --config models/tiny --out profiles/this-host.yaml [--peer ic-a=10.2.0.1:7700 ...]
    hexgen-zmq profile --serve-probe --listen 0.0.0.0:7700
"""

from __future__ import annotations

import argparse
import os
import socket
import socketserver
import statistics
import sys
import time
from pathlib import Path

PROBE_PORT = 7700
SOCKET_TIMEOUT_S = 30.0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `profile` subcommand."""
    p = subparsers.add_parser("profile", help="measure this host's per-layer times and links for the planner",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="deployment file (its model and dtype) or checkpoint directory")
    p.add_argument("--out", help="profile YAML to write")
    p.add_argument("--host", default=None, help="this host's name in the cluster file (default: hostname)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the deployment's, or float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads, as one stage rank runs")
    p.add_argument("--devices", type=int, default=None,
                   help="devices (ranks) this host offers, for the memory per device (CPU default: cores / threads)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to load and time")
    p.add_argument("--prompt-lens", default="16,64,256", help="prefill prompt lengths")
    p.add_argument("--batches", default="1,4,16", help="decode batch sizes")
    p.add_argument("--contexts", default="64,256", help="decode context lengths")
    p.add_argument("--repeats", type=int, default=8, help="timed runs per shape (median)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="measure the link to a peer running --serve-probe (repeatable)")
    p.add_argument("--probe-bytes", type=int, default=4 << 20, help="bytes of the bandwidth probe")
    p.add_argument("--serve-probe", action="store_true", help="answer other hosts' link probes (runs until stopped)")
    p.add_argument("--listen", default=f"0.0.0.0:{PROBE_PORT}", help="with --serve-probe: HOST:PORT")
    p.set_defaults(func=run)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"--{what}: expected positive integers, got {text!r}")
    return values


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    """Serve probes, or measure and write the profile; 2 on invalid input."""
    try:
        if args.serve_probe:
            return serve_probe(*_address(args.listen))
        if not args.config or not args.out:
            raise ValueError("--config and --out are required (or --serve-probe)")
        peers = []
        for entry in args.peer:
            name, sep, address = entry.partition("=")
            if not sep or not name:
                raise ValueError(f"--peer: expected NAME=HOST:PORT, got {entry!r}")
            peers.append((name, *_address(address)))
        shapes = (_ints(args.prompt_lens, "prompt-lens"), _ints(args.batches, "batches"), _ints(args.contexts, "contexts"))
    except ValueError as exc:
        print(f"hexgen-zmq profile: {exc}", file=sys.stderr)
        return 2
    from hexgen_zmq.planner.profile import LinkFigure, parse_profile, write_profile
    from hexgen_zmq.stage.core_share import passive_openmp

    passive_openmp()  # as a stage runs (before torch is imported)
    data = measure_device(args.config, args.device, args.dtype, args.threads, args.layers, *shapes, args.repeats,
                          args.devices)
    data["host"] = args.host or socket.gethostname()
    links = []
    for name, host, port in peers:
        gbps, latency_ms = probe_link(host, port, args.probe_bytes)
        links.append(LinkFigure(name, host, round(gbps, 4), round(latency_ms, 3)))
        print(f"link to {name} ({host}:{port}): {gbps:.3f} Gbit/s, {latency_ms:.2f} ms one way")
    profile = parse_profile({**data, "links": [dict(peer=x.peer, address=x.address, gbps=x.gbps, latency_ms=x.latency_ms) for x in links]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_profile(args.out, profile, f"hexgen-zmq profile of {data['host']}: {data['model']['name']}, "
                                     f"{args.layers} layers timed, {args.repeats} runs per shape (medians)")
    print_profile(profile)
    print(f"wrote {args.out}")
    return 0


def print_profile(profile) -> None:
    print(f"{profile.host}: {profile.device.kind} {profile.device.dtype}, {profile.device.threads} thread(s), "
          f"model {profile.model.name}")
    for p in profile.prefill:
        print(f"  prefill {p.prompt_len:5d} tokens: {p.layer_s_per_token * 1e6:8.2f} us/token/layer")
    for p in profile.decode:
        print(f"  decode batch {p.batch:3d} context {p.context:5d}: {p.layer_s * 1e6:8.1f} us/layer/step")
    for p in profile.head:
        print(f"  head {p.rows:3d} rows: {p.s * 1e6:8.1f} us")
    print(f"  stage overhead: {profile.stage_overhead_s * 1e6:.1f} us/step")


# --- device ------------------------------------------------------------------------------------------------------
def _model_source(config: str, dtype: str | None) -> tuple[Path, str]:
    """A checkpoint directory as given, or a deployment file's model path and dtype."""
    path = Path(config)
    if path.is_dir():
        return path, dtype or "float32"
    from hexgen_zmq.operations.deployment import load_deployment

    deployment = load_deployment(path)
    return Path(deployment.model.path), dtype or deployment.model.dtype


def _memory_gib(device: str, devices: int | None, threads: int) -> float:
    """Memory per device: a GPU's own, or the host's RAM shared among its CPU ranks."""
    import torch

    if device.startswith("cuda"):
        return round(torch.cuda.get_device_properties(torch.device(device)).total_memory / 1024**3, 2)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    count = devices or max(1, (os.cpu_count() or 1) // threads)
    return round(total / count / 1024**3, 2)


def measure_device(config: str, device_name: str, dtype_name: str | None, threads: int, layers: int,
                   prompt_lens: list[int], batches: list[int], contexts: list[int], repeats: int,
                   devices: int | None = None) -> dict:
    """Time prefill, decode, head and per-step overhead through StageWorker.step; the profile's fields."""
    import torch

    from hexgen_zmq.model.checkpoint import ShardPlan
    from hexgen_zmq.model.info import read_model_info
    from hexgen_zmq.model.runner import StageModel
    from hexgen_zmq.stage.worker import StageWorker

    path, dtype_name = _model_source(config, dtype_name)
    info = read_model_info(path)
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    count = max(1, min(layers, info.num_layers))
    model = StageModel(info, (0, count), first=True, last=True, dtype=dtype, device=device,
                       shard=ShardPlan.make(info, 0, 1))
    clock = _Clock(device)
    timed = [_Timed(layer, clock, "layer") for layer in model.layers]
    model.layers = torch.nn.ModuleList(timed)
    model.norm = _Timed(model.norm, clock, "head")
    model.lm_head = _Timed(model.lm_head, clock, "head")
    longest = max(max(prompt_lens), max(contexts) + repeats + 4)
    blocks = (max(batches) * longest) // 16 + max(batches) + 8
    worker = StageWorker(model, blocks, 16)
    runner = _Runner(worker, clock, info.vocab_size, info.hidden_size)

    prefill = []
    for prompt in prompt_lens:
        runner.prefill([prompt])  # warm-up: oneDNN settles on this shape
        samples = [runner.prefill([prompt])["layer"] / count / prompt for _ in range(repeats)]
        prefill.append({"prompt_len": prompt, "layer_s_per_token": _sig(statistics.median(samples))})
    decode, head, overhead = [], {}, []
    for ctx in contexts:
        for batch in batches:
            figures = runner.decode(batch, ctx, repeats)
            decode.append({"batch": batch, "context": ctx, "layer_s": _sig(statistics.median(f["layer"] / count for f in figures))})
            head.setdefault(batch, []).extend(f["head"] for f in figures)
            overhead.extend(f["rest"] + f["wire"] for f in figures)
    return {
        "version": 1,
        "host": "",
        "device": {"kind": "cuda" if device.type == "cuda" else "cpu", "name": "cpu" if device.type == "cpu" else
                   torch.cuda.get_device_name(device), "dtype": dtype_name, "threads": threads,
                   "memory_gib": _memory_gib(device_name, devices, threads)},
        "model": {"name": path.name, "hidden_size": info.hidden_size, "intermediate_size": info.intermediate_size,
                  "num_attention_heads": info.num_heads, "num_key_value_heads": info.num_kv_heads,
                  "head_dim": info.head_dim, "vocab_size": info.vocab_size},
        "prefill": prefill,
        "decode": decode,
        "head": [{"rows": rows, "s": _sig(statistics.median(v))} for rows, v in sorted(head.items())],
        "stage_overhead_s": _sig(max(statistics.median(overhead), 0.0)),
    }


def _sig(x: float) -> float:
    return float(f"{x:.4g}")


class _Clock:
    """Seconds, with the device synchronised first (a GPU's kernels run asynchronously)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.spent: dict[str, float] = {}

    def __call__(self) -> float:
        if self.sync:
            self.sync()
        return time.perf_counter()


def _Timed(inner, clock: _Clock, key: str):
    """`inner` wrapped so that each call adds its time to clock.spent[key]."""
    import torch

    class Timed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            start = clock()
            out = self.inner(*args)
            clock.spent[key] = clock.spent.get(key, 0.0) + clock() - start
            return out

    return Timed()


class _Runner:
    """Drives StageWorker.step with prompts and decode steps, and splits each step's time."""

    def __init__(self, worker, clock: _Clock, vocab: int, hidden: int):
        self.worker, self.clock, self.vocab, self.hidden = worker, clock, vocab, hidden
        self.next_id = 1

    def _step(self, batch, tokens) -> dict[str, float]:
        import torch

        from hexgen_zmq.wire import codec as wire
        self.clock.spent = {}
        inputs = torch.randint(3, self.vocab, (tokens,))
        start = self.clock()
        self.worker.step(batch, inputs)
        wall = self.clock() - start
        layer, head = self.clock.spent.get("layer", 0.0), self.clock.spent.get("head", 0.0)
        # What the stage adds to send the step on: the micro-batch and its hidden states, encoded and decoded.
        hidden = torch.zeros(tokens, self.hidden, dtype=self.worker.model.dtype)
        start = time.perf_counter()
        wire.decode([bytes(f) for f in wire.encode(batch, [hidden])])
        return {"layer": layer, "head": head, "rest": wall - layer - head, "wire": time.perf_counter() - start}

    def prefill(self, prompts: list[int], extra: int = 1) -> dict[str, float]:
        """One micro-batch carrying whole prompts; the requests are released unless `extra` decode steps
        are to follow (then their ids are kept in self.ids)."""
        from hexgen_zmq.wire.messages import MicroBatch, NewRequest, SamplingParams, Segment

        ids = list(range(self.next_id, self.next_id + len(prompts)))
        self.next_id += len(prompts)
        params = SamplingParams(max_new_tokens=extra + 1, ignore_eos=True)
        new = [NewRequest(i, p + extra + 1, params, []) for i, p in zip(ids, prompts)]
        figures = self._step(MicroBatch(0, [Segment(i, 0, p, True) for i, p in zip(ids, prompts)], new, []),
                             sum(prompts))
        self.ids = ids
        if extra == 1:
            for i in ids:
                self.worker.release(i)
        return figures

    def decode(self, batch: int, context: int, repeats: int) -> list[dict[str, float]]:
        """`repeats` timed decode steps of `batch` requests prefilled to `context` (two warm-up steps)."""
        from hexgen_zmq.wire.messages import MicroBatch, Segment

        steps = repeats + 2
        self.prefill([context] * batch, extra=steps + 2)
        ids, out = self.ids, []
        for step in range(steps):
            segments = [Segment(i, context + step, 1, True) for i in ids]
            figures = self._step(MicroBatch(step + 1, segments, [], []), batch)
            if step >= 2:
                out.append(figures)
        for i in ids:
            self.worker.release(i)
        return out


# --- links -------------------------------------------------------------------------------------------------------
class _ProbeHandler(socketserver.StreamRequestHandler):
    """PING -> PONG (latency); BULK n, then n bytes -> OK (goodput)."""

    def handle(self) -> None:
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while line := self.rfile.readline(64):
            if line == b"PING\n":
                self.wfile.write(b"PONG\n")
            elif line.startswith(b"BULK "):
                left = int(line[5:])
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        return
                    left -= len(chunk)
                self.wfile.write(b"OK\n")
            else:
                return
            self.wfile.flush()


class _ProbeServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_probe(host: str, port: int) -> int:
    """Answer link probes until interrupted."""
    with _ProbeServer((host, port), _ProbeHandler) as server:
        print(f"probe server on {host}:{server.server_address[1]}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def probe_link(host: str, port: int, nbytes: int = 4 << 20, pings: int = 20, bulks: int = 3) -> tuple[float, float]:
    """(goodput in Gbit/s, one-way latency in ms) to a probe server: half the median round trip of a small
    message; bulk transfers of `nbytes` with one round trip taken off, median of `bulks`."""
    with socket.create_connection((host, port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            sock.sendall(b"PING\n")
            if reader.readline() != b"PONG\n":
                raise ConnectionError(f"{host}:{port} is not a hexgen-zmq probe server")
            rtts.append(time.perf_counter() - start)
        rtt = statistics.median(rtts)
        payload = b"\0" * nbytes
        rates = []
        for _ in range(bulks):
            start = time.perf_counter()
            sock.sendall(b"BULK %d\n" % nbytes)
            sock.sendall(payload)
            if reader.readline() != b"OK\n":
                raise ConnectionError(f"{host}:{port}: bulk probe not acknowledged")
            rates.append(nbytes * 8 / max(time.perf_counter() - start - rtt, 1e-9) / 1e9)
    return statistics.median(rates), rtt / 2 * 1000
