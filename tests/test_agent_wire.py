"""blink_agent.wire: exact bytes, every bad header with its code, split feeding."""

from __future__ import annotations

import struct

import pytest
import test_agent_peer  # noqa: F401  (puts guest-agent/ on sys.path)

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
from blink_agent.wire import (
    DEFAULT_MAX_PAYLOAD,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    Frame,
    FrameDecoder,
    MsgType,
    ProtocolError,
    encode_frame,
    encode_header,
)


def test_constants():
    assert MAGIC == 0x424C494E
    assert VERSION == 1
    assert HEADER.format in ("<IBBHIQ", b"<IBBHIQ")
    assert HEADER_SIZE == 20
    assert DEFAULT_MAX_PAYLOAD == 16 * 1024 * 1024
    assert {t.name: int(t) for t in MsgType} == {
        "Handshake": 1,
        "Heartbeat": 2,
        "Error": 3,
        "RpcRequest": 0x10,
        "RpcResponse": 0x11,
        "RpcError": 0x12,
        "StreamData": 0x20,
        "TtyResize": 0x21,
        "Stdout": 0x30,
        "Stderr": 0x31,
    }


def test_encode_exact_bytes():
    assert encode_frame(MsgType.Handshake, 1) == struct.pack("<IBBHIQ", 0x424C494E, 1, 0x01, 0, 0, 1)
    assert encode_frame(MsgType.Handshake, 1)[:4] == b"NILB"
    assert encode_frame(MsgType.Heartbeat, 7, b"pong") == (
        b"NILB\x01\x02\x00\x00\x04\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00pong"
    )
    assert encode_frame(0x30, 2**64 - 1, b"x", flags=0xBEEF) == (
        struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0xBEEF, 1, 2**64 - 1) + b"x"
    )
    assert encode_header(MsgType.Stdout, 3, 5) == struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0, 5, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"msg_type": 0x04, "request_id": 1},
        {"msg_type": 0x10, "request_id": -1},
        {"msg_type": 0x10, "request_id": 2**64},
        {"msg_type": 0x10, "request_id": 1, "flags": 0x10000},
    ],
)
def test_encode_rejects_bad_fields(kwargs):
    with pytest.raises(ValueError):
        encode_frame(**kwargs)


def test_decode_roundtrip_and_flags_kept():
    data = (
        encode_frame(MsgType.Handshake, 1, b"")
        + encode_frame(MsgType.Stdout, 9, b"hello", flags=3)
        + encode_frame(MsgType.RpcRequest, 0, b"{}")
    )
    frames = list(FrameDecoder().feed(data))
    assert frames == [Frame(1, 0, 1, b""), Frame(0x30, 3, 9, b"hello"), Frame(0x10, 0, 0, b"{}")]
    msg_type, flags, request_id, payload = frames[1]
    assert (msg_type, flags, request_id, payload) == (0x30, 3, 9, b"hello")


def test_decode_split_byte_by_byte():
    frames = [Frame(0x30, 0, i, bytes([i]) * i) for i in range(40)] + [Frame(0x02, 0, 5, b"")]
    data = b"".join(encode_frame(f.msg_type, f.request_id, f.payload) for f in frames)
    dec = FrameDecoder()
    got = []
    for i in range(len(data)):
        got.extend(dec.feed(data[i : i + 1]))
        assert dec.buffered < HEADER_SIZE + 40
    assert got == frames
    assert dec.at_frame_boundary()


@pytest.mark.parametrize("split", [1, 2, 7, 19, 20, 21, 33])
def test_decode_split_everywhere(split):
    data = encode_frame(MsgType.RpcResponse, 77, b'{"ok":true}') * 3
    dec = FrameDecoder()
    got = list(dec.feed(data[:split])) + list(dec.feed(data[split:]))
    assert [f.request_id for f in got] == [77, 77, 77]


BAD = [
    ("bad_magic", struct.pack("<IBBHIQ", 0x424C494F, 1, 1, 0, 0, 1)),
    ("bad_magic", b"GET / HTTP/1.1\r\nHost:"),
    ("bad_version", struct.pack("<IBBHIQ", MAGIC, 2, 1, 0, 0, 1)),
    ("bad_version", struct.pack("<IBBHIQ", MAGIC, 0, 0x99, 0, 2**32 - 1, 1)),  # version before type, length
    ("unknown_type", struct.pack("<IBBHIQ", MAGIC, 1, 0x04, 0, 0, 1)),
    ("unknown_type", struct.pack("<IBBHIQ", MAGIC, 1, 0xFF, 0, 2**32 - 1, 1)),  # type before length
    ("frame_too_large", struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0, 16 * 1024 * 1024 + 1, 1)),
    ("frame_too_large", struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0, 2**32 - 1, 1)),  # 4 GiB
]


@pytest.mark.parametrize("code,header", BAD)
def test_bad_headers(code, header):
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        list(dec.feed(header))
    assert info.value.code == code
    assert isinstance(info.value, ValueError)
    # No resync: the decoder stays broken.
    with pytest.raises(ProtocolError) as again:
        list(dec.feed(encode_frame(MsgType.Handshake, 1)))
    assert again.value.code == code


def test_huge_length_rejected_from_header_alone():
    dec = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        for byte in struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0, 2**32 - 1, 1):
            list(dec.feed(bytes([byte])))
    assert info.value.code == "frame_too_large"
    assert dec.buffered == 0  # nothing was kept for the payload


def test_limit_is_configurable_and_inclusive():
    dec = FrameDecoder(max_payload=4)
    assert list(dec.feed(encode_frame(MsgType.Stdout, 1, b"abcd"))) == [Frame(0x30, 0, 1, b"abcd")]
    with pytest.raises(ProtocolError, match="frame_too_large"):
        list(dec.feed(encode_frame(MsgType.Stdout, 1, b"abcde")))


def test_header_checked_before_payload_arrives():
    dec = FrameDecoder(max_payload=10)
    with pytest.raises(ProtocolError) as info:
        list(dec.feed(struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0, 11, 1)))  # no payload byte yet
    assert info.value.code == "frame_too_large"
    dec = FrameDecoder()
    assert list(dec.feed(struct.pack("<IBBHIQ", MAGIC, 1, 0x30, 0, 3, 1))) == []
    assert not dec.at_frame_boundary()
    with pytest.raises(ProtocolError):
        list(FrameDecoder().feed(b"NILB\x01\x05" + b"\x00" * 14))


def test_good_frames_before_a_bad_header_are_yielded_first():
    dec = FrameDecoder()
    data = encode_frame(MsgType.Handshake, 1, b"blink-vhub-ready") + b"GET / HTTP/1.1\r\n\r\n\r\n"
    it = dec.feed(data)
    assert next(it) == Frame(1, 0, 1, b"blink-vhub-ready")
    with pytest.raises(ProtocolError, match="bad_magic"):
        next(it)
