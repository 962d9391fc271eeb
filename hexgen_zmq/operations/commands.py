"""Runtime subcommands: stage, broker, up, serve, generate, status, make-tiny-model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("stage", help="run one rank of one stage")
    p.add_argument("--config", required=True, help="deployment file")
    p.add_argument("--stage", required=True, help="stage id in the deployment file")
    p.add_argument("--rank", type=int, default=0, help="TP rank within the stage (0 is the leader)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--max-threads", type=int, default=None, help="torch CPU threads up to this many while no other stage process on this machine computes (default: every core; equal to --threads pins it)")
    p.add_argument("--notify", default=None, help="endpoint to report ready to (used by `up`)")
    p.add_argument("--keys", default=None, help=KEYS_HELP)
    p.set_defaults(func=cmd_stage)

    p = subparsers.add_parser("broker", help="run the broker")
    p.add_argument("--config", required=True)
    p.add_argument("--notify", default=None)
    p.add_argument("--keys", default=None, help=KEYS_HELP)
    p.set_defaults(func=cmd_broker)

    p = subparsers.add_parser("keys", help="write a CurveZMQ key pair: DIR/NAME.key (public) and "
                                           "DIR/NAME.key_secret (owner-only)")
    p.add_argument("name", help="a host name from the deployment file's hosts:, or a client's name")
    p.add_argument("--out", required=True, help="folder to write the two certificate files into")
    p.set_defaults(func=cmd_keys)

    p = subparsers.add_parser("up", help="supervise the processes of a deployment: every one on this machine, "
                                         "or those placed on one host (--host)")
    p.add_argument("config", help="deployment file (watched: a new version is applied, see `redeploy`)")
    p.add_argument("--host", default=None, help="run only the processes placed on this host (a name from "
                                                "`hosts:`, or the address its ranks give)")
    p.add_argument("--keys", default=None, help=KEYS_HELP + "; passed on to every process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores / ranks on this host)")
    p.add_argument("--max-threads", type=int, default=None, help="torch threads per rank up to this many while no other stage process on this machine computes (default: every core; equal to --threads pins it)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every process to be ready")
    p.add_argument("--log-dir", default=None, help="write each process's output to a file here")
    p.add_argument("--http", type=parse_listen, default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI API and /metrics here (a `serve` process; its options below)")
    add_serve_args(p)
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("redeploy", help="validate a new deployment file and replace the running one with "
                                               "it atomically; the running system converges to it")
    p.add_argument("config", help="the deployment file the processes follow")
    p.add_argument("new", help="the new version")
    p.set_defaults(func=cmd_redeploy)

    p = subparsers.add_parser("render", help="write operators' files for one host (systemd units)")
    p.add_argument("kind", choices=["systemd"])
    p.add_argument("config", help="deployment file")
    p.add_argument("--host", required=True, help="the host the units are for")
    p.add_argument("--out", required=True, help="folder to write the units into")
    p.add_argument("--per-process", action="store_true",
                   help="one unit per process with systemd's restart policy, instead of the host's supervisor")
    p.add_argument("--log-dir", default=None, help="(supervisor unit) each process's output goes to a file here")
    p.set_defaults(func=cmd_render)

    p = subparsers.add_parser("serve", help="serve the OpenAI API (/v1/completions, /v1/chat/completions) and "
                                            "Prometheus /metrics in front of a running deployment")
    p.add_argument("--config", required=True, help="deployment file (the broker's address and the model)")
    p.add_argument("--listen", type=parse_listen, default=parse_listen("127.0.0.1:8000"), help="HOST:PORT")
    add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("generate", help="send one request to a running deployment and stream the answer")
    p.add_argument("--config", required=True, help="deployment file (for the broker's address)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="plain text prompt")
    group.add_argument("--chat", help="a user message, wrapped in the checkpoint's chat template")
    group.add_argument("--prompt-ids", help="comma-separated token ids")
    add_sampling_args(p)
    add_client_keys(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("status", help="show the broker's pipelines")
    p.add_argument("--config", required=True)
    add_client_keys(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("make-tiny-model", help="write a small random Llama checkpoint with a tokenizer")
    p.add_argument("dir")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)


KEYS_HELP = "folder with this host's HOST.key_secret (CURVE, for deployments off loopback)"
CLIENT_KEYS_HELP = "this client's secret key file, or a folder holding one *.key_secret (CURVE)"


def add_client_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keys", default=None, help=CLIENT_KEYS_HELP)


def client_credentials(deployment, keys: str | None) -> dict:
    """Client.connect's keys= and server_key= for a CLI client: its secret key file (given, or the one in a
    folder) and the public key the deployment file lists for the broker's host."""
    if keys is None:
        return {}
    from hexgen_zmq.wire.security import SecurityError, host_key

    path = Path(keys)
    if path.is_dir():
        found = sorted(path.glob("*.key_secret"))
        if len(found) != 1:
            raise SecurityError(f"{path} holds {len(found)} secret keys: give the file itself")
        path = found[0]
    server_key = host_key(deployment, deployment.broker_host())
    if server_key is None:
        raise SecurityError(f"the deployment file lists no public_key for the broker's host {deployment.broker_host()}")
    return {"keys": str(path), "server_key": server_key}


def cmd_keys(args: argparse.Namespace) -> int:
    from hexgen_zmq.wire.security import write_keys

    public, secret = write_keys(args.name, Path(args.out))
    key = public.read_text().split('public-key = "')[1].split('"')[0]
    print(f"wrote {public} and {secret} (owner-only); public key: {key}")
    return 0


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """The gateway's options, shared by `serve` and `up --http` (which passes them on to `serve`)."""
    p.add_argument("--api-key", action="append", default=None, help="accept this bearer key (repeatable)")
    p.add_argument("--api-key-file", default=None, help="accept the keys in this file, one per line")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", default=None, help="the certificate's private key (PEM)")
    p.add_argument("--model-name", default=None, help="the model id to report (default: the checkpoint's directory)")
    p.add_argument("--default-chat-tokens", type=int, default=256, help="max_tokens of a chat request that gives none")
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="stream N tokens per chunk after the first (fewer, larger writes under load; default 1)")
    if not any(a.dest == "keys" for a in p._actions):  # `up` has its host's --keys; serve a client's
        add_client_keys(p)
    else:
        p.add_argument("--gateway-keys", default=None,
                       help="the gateway's own client key (" + CLIENT_KEYS_HELP + "), listed in security.client_keys:"
                            " needed when the broker's clients endpoint is off loopback (CURVE)")


def gateway_key_problem(deployment, gateway_keys: str | None) -> str | None:
    """Why `up --http` cannot start its gateway on this deployment, or None: a gateway is a client of the
    broker, and a CURVE broker takes requests only from the client keys the deployment lists, not from a
    host's key."""
    from hexgen_zmq.operations.deployment import endpoint_host, is_loopback
    from hexgen_zmq.wire.security import security_mode

    if gateway_keys is not None or security_mode(deployment) != "curve":
        return None
    if is_loopback(endpoint_host(deployment.broker.clients)):
        return None
    return (f"--http: the broker's clients endpoint {deployment.broker.clients} is a CURVE server, which takes "
            "requests only from a key in security.client_keys: give the gateway one with --gateway-keys "
            "(make it with `hexgen-zmq keys`, then list its public key there)")


def cmd_serve(args: argparse.Namespace) -> int:
    from hexgen_zmq.serving.gateway import cmd_serve as serve_gateway

    return serve_gateway(args)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


def cmd_stage(args: argparse.Namespace) -> int:
    from hexgen_zmq.stage.core_share import passive_openmp

    passive_openmp()  # before torch is imported
    from hexgen_zmq.stage.process import run_stage

    return run_stage(args.config, args.stage, args.rank, args.notify, args.threads, args.keys, args.max_threads)


def cmd_broker(args: argparse.Namespace) -> int:
    from brokers.broker import run_broker

    return run_broker(args.config, args.notify, args.keys)


def stop_on_signals() -> list[bool]:
    """A list that Ctrl-C or SIGTERM appends to, from now on."""
    stopping: list[bool] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    return stopping


def supervise(supervisor, stopping: list[bool], gateway: GatewayProcess | None = None) -> int:
    """Keep this host's processes running (and the gateway, when there is one) until Ctrl-C / SIGTERM."""
    try:
        while not stopping:
            supervisor.step()
            if gateway is not None and not gateway.alive:
                print("hexgen-zmq: the HTTP gateway exited; restarting it", file=sys.stderr)
                gateway.restart()
            time.sleep(0.1)
        return 0
    finally:
        print("hexgen-zmq: stopping", file=sys.stderr)
        if gateway is not None:
            gateway.stop()
        supervisor.stop()


class GatewayProcess:
    """`hexgen-zmq serve` as a child process, for `up --http`, `demo --http` and `bench --launch --http`."""

    def __init__(self, config: str | Path, listen: tuple[str, int], options: list[str] | None = None,
                 log_path: str | Path | None = None, tls: bool = False):
        self.host, self.port = listen
        self.url = f"{'https' if tls else 'http'}://{self.host}:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "hexgen_zmq.cli", "serve", "--config", str(config), "--listen",
                    f"{self.host}:{self.port}", *(options or [])]
        self.restart()

    def restart(self) -> None:
        import os
        import subprocess

        from hexgen_zmq.operations.parent_death import child_env

        out = open(self.log_path, "ab") if self.log_path else None
        self.process = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                        env=child_env(dict(os.environ)), start_new_session=True)
        if out is not None:
            out.close()

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float = 120.0, stop_requested=lambda: False) -> None:
        """Return once the gateway accepts connections (uvicorn listens only after it has connected to the
        broker); RuntimeError if it exits, time runs out or `stop_requested()`."""
        import socket

        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive:
                raise RuntimeError(f"the HTTP gateway exited (status {self.process.returncode})")
            if stop_requested():
                raise RuntimeError("stopped during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP gateway was not listening after {timeout_s:g} s")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> None:
        import subprocess

        if self.alive:
            self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def serve_options(args: argparse.Namespace) -> list[str]:
    """The `serve` options (add_serve_args) set in `args`, as a command line to pass on."""
    out: list[str] = []
    for key in args.api_key or []:
        out += ["--api-key", key]
    for name in ("api_key_file", "ssl_certfile", "ssl_keyfile", "model_name"):
        if (value := getattr(args, name)) is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    if getattr(args, "gateway_keys", None) is not None:  # `up`'s key for its gateway: `serve --keys`
        out += ["--keys", str(args.gateway_keys)]
    out += ["--default-chat-tokens", str(args.default_chat_tokens), "--stream-interval", str(args.stream_interval)]
    if args.access_log:
        out.append("--access-log")
    return out


def start_gateway(args: argparse.Namespace, config: str | Path, log_dir: str | Path | None,
                  stop_requested=lambda: False) -> GatewayProcess:
    """Start `serve` on args.http with the options in `args` and wait until it listens."""
    log_path = Path(log_dir) / "gateway.log" if log_dir else None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    gateway = GatewayProcess(config, args.http, serve_options(args), log_path, tls=bool(args.ssl_certfile))
    try:
        gateway.wait_ready(stop_requested=stop_requested)
    except BaseException:
        gateway.stop()
        raise
    return gateway


def cmd_up(args: argparse.Namespace) -> int:
    from hexgen_zmq.operations.deployment import DeploymentError
    from hexgen_zmq.operations.launcher import LaunchError
    from hexgen_zmq.wire.security import SecurityError
    from hexgen_zmq.operations.supervisor import Supervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [supervisor] %(levelname)s %(message)s")
    # Ctrl-C or SIGTERM while starting: the start-up wait notices and stops what it started.
    stopping = stop_on_signals()
    try:
        supervisor = Supervisor(args.config, args.host, log_dir=args.log_dir, threads=args.threads, keys=args.keys,
                                max_threads=args.max_threads)
    except (DeploymentError, LaunchError, SecurityError) as exc:
        print(f"hexgen-zmq: {exc}", file=sys.stderr)
        return 1
    deployment = supervisor.deployment
    if args.http is not None and (problem := gateway_key_problem(deployment, args.gateway_keys)):
        print(f"hexgen-zmq: {problem}", file=sys.stderr)
        supervisor.stop()
        return 2
    layout = ", ".join(f"{p.id}: " + " -> ".join(f"{s.id}[{s.layers[0]},{s.layers[1]})x{s.tp}" for s in p.stages)
                       for p in deployment.pipelines)
    where = f" on host {args.host} ({', '.join(sorted(supervisor.wanted))})" if args.host else ""
    print(f"hexgen-zmq: starting {layout}{where}", file=sys.stderr)
    try:
        supervisor.wait_ready(args.timeout, stop_requested=lambda: bool(stopping))
    except LaunchError as exc:
        print(f"hexgen-zmq: {exc}", file=sys.stderr)
        supervisor.stop()
        return 0 if stopping else 1
    print(f"hexgen-zmq: ready; clients connect to {deployment.broker.clients}", flush=True)
    gateway = None
    if args.http is not None:
        try:
            gateway = start_gateway(args, args.config, args.log_dir, lambda: bool(stopping))
        except RuntimeError as exc:
            print(f"hexgen-zmq: {exc}", file=sys.stderr)
            supervisor.stop()
            return 0 if stopping else 1
        print(f"hexgen-zmq: OpenAI API at {gateway.url}/v1, metrics at {gateway.url}/metrics", flush=True)
    return supervise(supervisor, stopping, gateway)


def cmd_render(args: argparse.Namespace) -> int:
    from hexgen_zmq.operations.deployment import DeploymentError, load_deployment
    from hexgen_zmq.operations.supervision import host_processes
    from hexgen_zmq.operations.systemd_units import render

    try:
        deployment = load_deployment(args.config, check_checkpoint=False)
    except DeploymentError as exc:
        print(f"hexgen-zmq: {exc}", file=sys.stderr)
        return 1
    if not host_processes(deployment, args.host):
        print(f"hexgen-zmq: no process of {args.config} is placed on host {args.host!r}", file=sys.stderr)
        return 1
    for path in render(deployment, Path(args.config), args.host, Path(args.out), args.per_process,
                       Path(args.log_dir).resolve() if args.log_dir else None):
        print(path)
    return 0


def cmd_redeploy(args: argparse.Namespace) -> int:
    """Validate NEW, then put it in place of F by a rename (atomic on one file system), so that every
    process watching F sees either the old version or the new one, never half of a file."""
    import os
    import tempfile

    from hexgen_zmq.operations.deployment import DeploymentError, load_deployment

    try:
        load_deployment(args.new)
    except DeploymentError as exc:
        print(f"hexgen-zmq: {args.new} is refused, {args.config} is unchanged: {exc}", file=sys.stderr)
        return 1
    target = Path(args.config)
    text = Path(args.new).read_bytes()
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if target.exists():
            os.chmod(temporary, target.stat().st_mode & 0o777)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    from hexgen_zmq.operations.deployment import file_version

    print(f"hexgen-zmq: {target} is now version {file_version(text)}; the running system converges to it")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hexgen_zmq.serving.client import GenerationError
    from hexgen_zmq.operations.deployment import load_deployment

    deployment = load_deployment(args.config, check_checkpoint=False)
    request = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed)
    if args.prompt is not None:
        request["prompt"] = args.prompt
    elif args.chat is not None:
        request["messages"] = [{"role": "user", "content": args.chat}]
    else:
        request["prompt_ids"] = [int(t) for t in args.prompt_ids.split(",")]
    try:
        return asyncio.run(print_stream(deployment.broker.clients, request, deployment.model.path,
                                        client_credentials(deployment, args.keys)))
    except GenerationError as exc:
        print(f"\nhexgen-zmq: {exc}", file=sys.stderr)
        return 1


async def print_stream(address: str, request: dict, model_path: str, credentials: dict | None = None) -> int:
    """Stream the answer as text (decoded incrementally with the checkpoint's tokenizer) and print timings."""
    from hexgen_zmq.serving.client import Client

    tokenizer = None
    if "prompt_ids" not in request:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
    start = time.perf_counter()
    ttft = None
    tokens: list[int] = []
    shown = ""
    async with await Client.connect(address, **(credentials or {})) as client:
        async for token in client.stream(**request):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            tokens.append(token)
            if tokenizer is None:
                sys.stdout.write(f"{token} ")
            else:
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
                    continue
                sys.stdout.write(text[len(shown):])
                shown = text
            sys.stdout.flush()
    total = time.perf_counter() - start
    print(f"\n[{len(tokens)} tokens, first after {ttft or 0:.3f} s, {len(tokens) / total:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from hexgen_zmq.serving.client import SyncClient
    from hexgen_zmq.operations.deployment import load_deployment

    deployment = load_deployment(args.config, check_checkpoint=False)
    with SyncClient(deployment.broker.clients, **client_credentials(deployment, args.keys)) as client:
        reply = client.status()
    for p in reply.pipelines:
        cached = ", ".join(f"{stage}:{n}" for stage, n in sorted(p.cached_requests.items()))
        blocks = ", ".join(f"{stage}:{p.kv_blocks_used.get(stage, 0)}/{total}"
                           for stage, total in sorted(p.kv_blocks_total.items()))
        bad = ", ".join(f"{stage}:{n}" for stage, n in sorted(p.bad_messages.items()))
        incarnations = ", ".join(f"{stage}:{n:016x}" for stage, n in sorted(p.incarnations.items()))
        print(f"{p.id}: ready={p.ready} healthy={p.healthy} in_flight={p.in_flight} "
              f"stages={','.join(p.stages_ready)} requests_cached=[{cached}] kv_blocks=[{blocks}] "
              f"bad_messages=[{bad}] incarnations=[{incarnations}] restarts={p.restarts} version={p.version}"
              + (" retiring" if p.retiring else "")
              + (f" failure={p.failure!r}" if p.failure else ""))
    for host in reply.hosts:
        processes = ", ".join(f"{p.name}:{p.state}" + (f"(restarts={p.restarts},last_exit={p.last_exit})"
                                                        if p.restarts or p.last_exit is not None else "")
                              for p in host.processes)
        print(f"host {host.host}: supervisor pid {host.pid} file={host.file_version} [{processes}]"
              + (f" refused_file={host.file_error!r}" if host.file_error else ""))
    print(f"deployment file: version {reply.file_version or '?'} redeploys={reply.redeploys}"
          + (f" refused={reply.file_error!r}" if reply.file_error else ""))
    failed = ", ".join(f"{code}:{n}" for code, n in sorted(reply.requests_failed.items()))
    print(f"queued: {reply.queued}  broker: {reply.broker:016x} bad_messages={reply.bad_messages} "
          f"attempts={reply.attempts} replayed={reply.replayed} failed_after_last_attempt={reply.gave_up} "
          f"requests_failed=[{failed}]")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from hexgen_zmq.model.tiny import make_tiny_model

    path = make_tiny_model(args.dir, num_layers=args.layers, hidden_size=args.hidden, seed=args.seed)
    print(f"wrote {path}")
    return 0
