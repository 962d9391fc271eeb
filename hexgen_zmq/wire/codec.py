"""The wire codec: a message and its tensors <-> ZeroMQ frames, with no copy of tensor bytes in Python.

Frame 0 is the MessagePack `Header`; each tensor travels as one raw frame of its bytes viewed as uint8 (so
bfloat16 survives). Sent with `copy=False`, pyzmq hands frames above its copy threshold (64 KiB) to libzmq
without copying; received frames become tensors with `torch.frombuffer`, also without a copy. Decoding
checks everything a peer could lie about (version, kind, dtype, shape, frame count, byte count) and raises
`WireError`, which the loops count and log; it never reaches code that could kill a process.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from hexgen_zmq.wire.messages import HEADER_ENCODER, PROTOCOL_VERSION, Header, Message, TensorMeta, WireError, decode_header

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_TENSOR_BYTES = 1 << 40  # far above any frame a socket admits; keeps shape arithmetic inside int64

# torch.frombuffer warns that ZeroMQ's buffers are read-only; received tensors are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def tensor_frame(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as a buffer that shares its memory (a copy only for non-contiguous or GPU data)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def encode(body: Message, tensors: Sequence[torch.Tensor] = ()) -> list[bytes | memoryview]:
    """Frames for `socket.send_multipart(frames, copy=False)`."""
    metas = []
    for tensor in tensors:
        name = DTYPE_NAMES.get(tensor.dtype)
        if name is None:
            raise WireError(f"dtype {tensor.dtype} cannot travel on the wire")
        metas.append(TensorMeta(name, list(tensor.shape)))
    header = HEADER_ENCODER.encode(Header(PROTOCOL_VERSION, body, metas))
    return [header, *(tensor_frame(t) for t in tensors)]


def _buffer(frame: object) -> memoryview:
    buffer = getattr(frame, "buffer", None)  # zmq.Frame from recv_multipart(copy=False)
    return buffer if buffer is not None else memoryview(frame)  # type: ignore[arg-type]


def decode(frames: Sequence[object]) -> tuple[Message, list[torch.Tensor]]:
    """Rebuild a message and its tensors from frames; tensors share the frames' memory."""
    if not frames:
        raise WireError("empty message")
    header = decode_header(_buffer(frames[0]))
    if len(frames) != 1 + len(header.tensors):
        raise WireError(f"header lists {len(header.tensors)} tensors but {len(frames) - 1} frames follow")
    tensors = []
    for index, (meta, frame) in enumerate(zip(header.tensors, frames[1:])):
        dtype = DTYPES.get(meta.dtype)
        if dtype is None:
            raise WireError(f"tensor {index}: unknown dtype {meta.dtype!r}")
        buffer = _buffer(frame)
        # Every dimension is below 2**31 (the schema); the product of the non-zero ones must stay inside
        # int64 too, or torch refuses the shape even when a zero dimension makes the byte count 0.
        if math.prod(d for d in meta.shape if d) * dtype.itemsize >= MAX_TENSOR_BYTES:
            raise WireError(f"tensor {index}: shape {meta.shape} of {meta.dtype} is too large")
        expected = math.prod(meta.shape) * dtype.itemsize
        if buffer.nbytes != expected:
            raise WireError(
                f"tensor {index}: shape {meta.shape} of {meta.dtype} needs {expected} bytes, frame has {buffer.nbytes}"
            )
        try:
            if expected == 0:
                tensors.append(torch.empty(meta.shape, dtype=dtype))
            else:
                tensors.append(torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(meta.shape))
        except (RuntimeError, ValueError, TypeError) as exc:  # whatever else torch refuses is the peer's error
            raise WireError(f"tensor {index}: {exc}") from None
    return header.body, tensors
