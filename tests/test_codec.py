"""Codec contract, on both backends: vectors, every violation, limits, and a
differential property test (whole and split at every byte)."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhubd import _codec_py, codec, errors, frames
from vhubd.frames import MsgType

H = struct.Struct("<IBBHIQ")
MAX = frames.DEFAULT_MAX_PAYLOAD


def hdr(t, length=0, rid=0, flags=0, magic=0x424C494E, version=1):
    return H.pack(magic, version, t, flags, length, rid)


# The exact bytes a Blink agent writes for its handshake and an RPC.
BLINK_HANDSHAKE = struct.pack("<IBBHIQ", 0x424C494E, 1, 0x01, 0, 0, 1)
BLINK_RPC_PAYLOAD = b'{"event":"execution_result","stdout":"hi\\n","stderr":"","exit_code":0}'
BLINK_RPC = struct.pack("<IBBHIQ", 0x424C494E, 1, 0x10, 0, len(BLINK_RPC_PAYLOAD), 2) + BLINK_RPC_PAYLOAD


def test_backend_choice_is_reported():
    assert codec.BACKEND in ("c", "python")
    assert codec.REASON


def test_known_vectors(codec_impl):
    assert BLINK_HANDSHAKE == b"NILB\x01\x01\x00\x00" + b"\x00" * 4 + b"\x01" + b"\x00" * 7
    assert codec_impl.pack_header(0x01, 1, 0) == BLINK_HANDSHAKE
    assert codec_impl.pack_header(0x10, 2, len(BLINK_RPC_PAYLOAD)) == BLINK_RPC[:20]
    assert codec_impl.pack_header(0x30, 2**64 - 1, 2**32 - 1, 0xFFFF) == hdr(0x30, 2**32 - 1, 2**64 - 1, 0xFFFF)
    sc = codec_impl.Scanner()
    stream = BLINK_HANDSHAKE + BLINK_RPC + hdr(0x30, 3, 7) + b"abc"
    assert sc.scan(stream, 0, len(stream), MAX) == (3, len(stream), frames.PENDING_NONE, 0, 0,
                                                  frames.TYPE_BIT[1] | frames.TYPE_BIT[0x10] | frames.TYPE_BIT[0x30])
    assert sc.headers() == [0, 1, 0, 0, 1, 20, 0x10, 0, len(BLINK_RPC_PAYLOAD), 2,
                            len(BLINK_HANDSHAKE) + len(BLINK_RPC), 0x30, 0, 3, 7]
    assert codec_impl.parse_header(BLINK_RPC) == (0x10, 0, len(BLINK_RPC_PAYLOAD), 2)


@pytest.mark.parametrize("t", [int(t) for t in MsgType])
def test_every_type_roundtrips(codec_impl, t):
    h = codec_impl.pack_header(t, 42, 5, 3)
    assert codec_impl.parse_header(h + b"12345") == (t, 3, 5, 42)


@pytest.mark.parametrize("bad, exc, status", [
    (hdr(1, magic=0x424C494F), errors.BadMagic, frames.BAD_MAGIC),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", errors.BadMagic, frames.BAD_MAGIC),
    (hdr(1, version=2), errors.BadVersion, frames.BAD_VERSION),
    (hdr(0x04), errors.UnknownType, frames.UNKNOWN_TYPE),
    (hdr(0xFF), errors.UnknownType, frames.UNKNOWN_TYPE),
    (hdr(0x30, MAX + 1), errors.FrameTooLarge, frames.FRAME_TOO_LARGE),
    (hdr(0x30, 2**32 - 1), errors.FrameTooLarge, frames.FRAME_TOO_LARGE),
])
def test_every_violation_has_its_error(codec_impl, bad, exc, status):
    with pytest.raises(exc) as info:
        codec_impl.parse_header(bad, 0, MAX)
    assert info.value.code == {frames.BAD_MAGIC: "bad_magic", frames.BAD_VERSION: "bad_version",
                               frames.UNKNOWN_TYPE: "unknown_type",
                               frames.FRAME_TOO_LARGE: "frame_too_large"}[status]
    assert isinstance(info.value, errors.ProtocolError) and isinstance(info.value, ValueError)
    sc = codec_impl.Scanner()
    good = hdr(0x02, 0, 9)
    res = sc.scan(good + bad, 0, len(good + bad), MAX)
    assert res[0] == 1 and res[3] == status and res[4] == len(good) and res[1] == len(good)


def test_checks_come_in_order(codec_impl):
    # bad magic wins over everything else, then version, then type, then length
    assert codec_impl.check_header(hdr(0xFF, 2**32 - 1, magic=1, version=9)) == frames.BAD_MAGIC
    assert codec_impl.check_header(hdr(0xFF, 2**32 - 1, version=9)) == frames.BAD_VERSION
    assert codec_impl.check_header(hdr(0xFF, 2**32 - 1), max_payload=MAX) == frames.UNKNOWN_TYPE
    assert codec_impl.check_header(hdr(0x30, 2**32 - 1), max_payload=MAX) == frames.FRAME_TOO_LARGE


def test_partial_header_is_checked_as_far_as_it_goes(codec_impl):
    sc = codec_impl.Scanner()
    assert sc.scan(b"NIL")[2:4] == (frames.PENDING_HEADER, frames.OK)
    assert sc.scan(b"NIX")[3] == frames.BAD_MAGIC
    assert sc.scan(b"NILB\x02")[3] == frames.BAD_VERSION
    assert sc.scan(b"NILB\x01\x77")[3] == frames.UNKNOWN_TYPE
    assert sc.scan(hdr(0x30, 2**32 - 1)[:12], 0, 12, MAX)[3] == frames.FRAME_TOO_LARGE
    assert sc.scan(hdr(0x30, 2**32 - 1)[:11], 0, 11, MAX)[2:4] == (frames.PENDING_HEADER, frames.OK)


def test_four_gib_header_rejected_without_reading_payload(codec_impl):
    # only the 20 header bytes exist: the verdict comes from the header alone
    sc = codec_impl.Scanner()
    count, consumed, pending, status, off, _ = sc.scan(hdr(0x30, 2**32 - 1), 0, 20, MAX)
    assert (count, consumed, status, off) == (0, 0, frames.FRAME_TOO_LARGE, 0)


def test_pending_payload_and_capacity(codec_impl):
    sc = codec_impl.Scanner(2)
    data = hdr(0x30, 2) + b"ab" + hdr(0x31, 1) + b"c" + hdr(0x30, 10) + b"xy"
    res = sc.scan(data, 0, len(data), MAX)
    assert res[:4] == (2, 22 + 21, frames.PENDING_MORE, 0)
    res = sc.scan(data, 43, len(data), MAX)
    assert res[:4] == (0, 43, frames.PENDING_PAYLOAD, 0)
    assert sc.headers() == []


def test_rewrite_and_pack_into(codec_impl):
    buf = bytearray(hdr(0x10, 2, 77) + b"{}")
    assert codec_impl.rewrite_request_id(buf, 0, 2**64 - 1) == 77
    assert codec_impl.parse_header(buf)[3] == 2**64 - 1
    with pytest.raises(ValueError):
        codec_impl.rewrite_request_id(buf, 5, 1)
    with pytest.raises(ValueError):
        codec_impl.rewrite_request_id(buf, 0, 2**64)
    with pytest.raises(TypeError):
        codec_impl.rewrite_request_id(bytes(buf), 0, 1)
    out = bytearray(30)
    codec_impl.pack_header_into(out, 10, 0x11, 5, 0)
    assert bytes(out[10:]) == hdr(0x11, 0, 5)
    with pytest.raises(ValueError):
        codec_impl.pack_header_into(out, 11, 0x11, 5, 0)
    with pytest.raises(ValueError):
        codec_impl.pack_header(0x04, 1, 0)
    with pytest.raises(ValueError):
        codec_impl.pack_header(0x10, 1, 2**32)


def test_memoryview_and_offsets(codec_impl):
    data = bytearray(b"junk" + hdr(0x30, 1, 3) + b"z")
    sc = codec_impl.Scanner()
    assert sc.scan(memoryview(data), 4)[:4] == (1, len(data), 0, 0)
    assert sc.headers() == [4, 0x30, 0, 1, 3]
    with pytest.raises(ValueError):
        sc.scan(data, 5, 2)


# --- differential property test ------------------------------------------------

def _frame(t, payload, rid, flags):
    return hdr(t, len(payload), rid, flags) + payload


frame_st = st.builds(_frame, st.sampled_from([int(t) for t in MsgType]), st.binary(max_size=40),
                     st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF))


@st.composite
def streams(draw):
    data = bytearray(b"".join(draw(st.lists(frame_st, max_size=6))))
    for _ in range(draw(st.integers(0, 3))):  # mutate a few bytes
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data += draw(st.binary(max_size=30))
    return bytes(data)


def _scan_all(impl, data, max_payload, capacity):
    sc = impl.Scanner(capacity)
    out = []
    pos = 0
    while True:
        res = sc.scan(data, pos, len(data), max_payload)
        out.append((res, tuple(sc.headers())))
        if res[2] != frames.PENDING_MORE or res[3]:
            return out
        pos = res[1]


def test_frame_boundary(codec_impl):
    data = hdr(0x30, 3) + b"abc" + hdr(0x31, 0) + hdr(0x30, 5) + b"12345"
    fb = codec_impl.frame_boundary
    assert [fb(data, k) for k in (0, 1, 23, 24, 43, 44, 68, 69)] == [0, 23, 23, 43, 43, 68, 68, 68]
    assert fb(data[:30], 25) == 30  # runs past the end of a cut buffer
    assert fb(b"", 5) == 0
    with pytest.raises(ValueError):
        fb(data, -1)


@settings(max_examples=400, deadline=None)
@given(streams(), st.sampled_from([0, 10, 40, MAX]), st.integers(1, 4))
def test_backends_agree(data, max_payload, capacity):
    impls = list(codec.backends().values())
    results = [_scan_all(i, data, max_payload, capacity) for i in impls]
    assert all(r == results[0] for r in results)
    for k in (0, 1, len(data) // 2, len(data)):
        assert len({i.frame_boundary(data, k) for i in impls}) == 1
    for i in impls:
        checks = [i.check_header(data, k, None, max_payload) for k in range(len(data))]
        assert checks == [impls[0].check_header(data, k, None, max_payload) for k in range(len(data))]


@settings(max_examples=150, deadline=None)
@given(streams())
def test_split_feeding_matches_whole(data):
    """Fed to a Connection whole or split at every byte, both backends see the
    same frames and the same verdict."""
    from vhubd.protocol import Connection, Side

    def run(impl, chunks):
        c = Connection(Side.CLIENT, max_payload=64, cut_through=1 << 30, codec_impl=impl)
        c.send_handshake(b"")
        seen = []
        for ch in chunks:
            for ev in c.receive_data(ch):
                name = type(ev).__name__
                if name == "StreamRun":
                    seen += [("F", f.msg_type, f.request_id, bytes(f.data)) for f in ev.frames()]
                elif name == "Frame":
                    seen.append(("F", ev.msg_type, ev.request_id, bytes(ev.data)))
                elif name == "Violation":
                    seen.append(("V", ev.error.code))
                elif name == "Handshake":
                    seen.append(("H", bytes(ev.payload)))
                else:
                    seen.append((name, getattr(ev, "request_id", None)))
        return seen, b"".join(c.data_to_send())

    for impl in codec.backends().values():
        whole = run(impl, [data])
        for cut in range(len(data) + 1):
            assert run(impl, [data[:cut], data[cut:]]) == whole
        assert run(impl, [data[i:i + 1] for i in range(len(data))]) == whole
        assert whole == run(_codec_py, [data])
