"""The wire codec, tested like vLLM's serializer: dtypes, layouts, sizes, frame counts, and lies."""

from __future__ import annotations

import msgspec
import pytest
import torch
import zmq

from hexgen_zmq.wire.messages import (HEADER_ENCODER, Header, MicroBatch, Segment, Submit, SamplingParams, TensorMeta,
                                 WireError, decode_control, encode_control)
from hexgen_zmq.wire.codec import decode, encode

BATCH = MicroBatch(7, [Segment(1, 0, 3, True)])


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 8),
    torch.randn(3, 8).to(torch.float16),
    torch.randn(3, 8).to(torch.bfloat16),
    torch.arange(12, dtype=torch.int64),
    torch.randn(8, 3).t(),  # non-contiguous
    torch.empty(0, 16),  # empty
    torch.tensor(3.5),  # scalar
], ids=["f32", "f16", "bf16", "i64", "noncontig", "empty", "scalar"])
def test_round_trip(tensor):
    frames = encode(BATCH, [tensor])
    assert len(frames) == 2
    message, (back,) = decode([bytes(f) for f in frames])
    assert message == BATCH
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_no_tensor_and_many_tensors():
    frames = encode(BATCH, [])
    assert len(frames) == 1
    assert decode(frames) == (BATCH, [])
    tensors = [torch.randn(2, 2), torch.arange(3)]
    message, back = decode([bytes(f) for f in encode(BATCH, tensors)])
    assert len(back) == 2 and all(torch.equal(a, b) for a, b in zip(tensors, back))


def test_large_tensors_are_not_copied_on_either_side():
    tensor = torch.randn(1024, 1024)  # 4 MiB
    frames = encode(BATCH, [tensor])
    assert frames[1].obj is not None and frames[1].nbytes == tensor.numel() * 4
    # the frame shares the tensor's memory
    assert torch.frombuffer(frames[1], dtype=torch.float32).data_ptr() == tensor.data_ptr()
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    try:
        push.send_multipart(frames, copy=False)
        assert pull.poll(5000)
        received = pull.recv_multipart(copy=False)
        message, (back,) = decode(received)
        assert torch.equal(back, tensor)
        assert back.data_ptr() == torch.frombuffer(received[1].buffer, dtype=torch.uint8).data_ptr()
    finally:
        push.close(0), pull.close(0), ctx.term()


def test_control_messages_round_trip_without_torch_frames():
    submit = Submit(3, [1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0.5, seed=9))
    assert decode_control(encode_control(submit)) == submit
    with pytest.raises(WireError):
        decode_control(encode(BATCH, [torch.zeros(2)]))


def lie(metas, frames):
    return [HEADER_ENCODER.encode(Header(1, BATCH, metas)), *frames]


@pytest.mark.parametrize("frames, why", [
    ([], "empty"),
    ([b"\x00garbage"], "malformed"),
    ([b""], "malformed"),
    ([HEADER_ENCODER.encode(Header(1, BATCH, []))[:-3]], "malformed"),  # truncated header
    ([msgspec.msgpack.encode([99, ["MicroBatch", 1, []], []])], "version"),
    ([msgspec.msgpack.encode([1, ["NoSuchKind", 1], []])], "malformed"),
    ([msgspec.msgpack.encode([1, ["MicroBatch", "x", []], []])], "malformed"),  # wrong field type
    (lie([TensorMeta("float32", [2, 2])], []), "frames follow"),  # missing frame
    (lie([], [b"1234"]), "frames follow"),  # extra frame
    (lie([TensorMeta("float32", [2, 2])], [b"\x00" * 15]), "needs 16 bytes"),  # truncated tensor
    (lie([TensorMeta("float32", [2, 2])], [b"\x00" * 17]), "needs 16 bytes"),
    (lie([TensorMeta("complex64", [2])], [b"\x00" * 16]), "unknown dtype"),
    (lie([TensorMeta("float32", [-1, 4])], [b""]), "malformed"),  # negative dimension
])
def test_lying_or_broken_messages_raise_wire_error(frames, why):
    with pytest.raises(WireError, match=why):
        decode(frames)
