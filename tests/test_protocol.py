"""The sans-I/O connection, on both codec backends: handshake rules,
heartbeats, limits, cut-through, and the zero-copy receive buffer."""

import struct

import pytest

from vhubd import frames
from vhubd.frames import MsgType
from vhubd.protocol import (
    Connection,
    Frame,
    Handshake,
    Ping,
    Pong,
    RemoteErrorEvent,
    Side,
    State,
    StreamChunk,
    StreamRun,
    StreamStart,
    Violation,
    encode_frame,
    parse_error_payload,
)

HS = struct.pack("<IBBHIQ", 0x424C494E, 1, 0x01, 0, 0, 1)


@pytest.fixture
def server(codec_impl):
    return Connection(Side.SERVER, codec_impl=codec_impl, max_payload=1024, cut_through=4096)


def frames_of(events):
    out = []
    for ev in events:
        if isinstance(ev, StreamRun):
            out += [(f.msg_type, f.request_id, bytes(f.payload)) for f in ev.frames()]
        elif isinstance(ev, Frame):
            out.append((ev.msg_type, ev.request_id, bytes(ev.payload)))
    return out


def test_server_handshake_then_hold_until_accept(server):
    ev = server.receive_data(HS + encode_frame(0x30, 3, b"early"))
    assert [type(e) for e in ev] == [Handshake] and ev[0].request_id == 1
    assert server.state is State.HANDSHAKE
    assert server.receive_data(encode_frame(0x31, 3, b"later")) == []  # held
    server.accept(request_id=1)
    assert server.data_to_send() == [encode_frame(1, 1, b"blink-vhub-ready")]
    assert frames_of(server.resume()) == [(0x30, 3, b"early"), (0x31, 3, b"later")]


def test_handshake_required(server):
    ev = server.receive_data(encode_frame(0x10, 1, b"{}"))
    assert isinstance(ev[0], Violation) and ev[0].error.code == "handshake_required"
    (out,) = server.data_to_send()
    assert out[5] == MsgType.ERROR and parse_error_payload(out[20:])[0] == "handshake_required"
    assert server.state is State.CLOSED
    assert server.receive_data(HS) == []  # nothing after close


@pytest.mark.parametrize("bad, code", [
    (b"SSH-2.0-OpenSSH\r\n", "bad_magic"),
    (struct.pack("<IBBHIQ", 0x424C494E, 2, 1, 0, 0, 1), "bad_version"),
    (struct.pack("<IBBHIQ", 0x424C494E, 1, 0x42, 0, 0, 1), "unknown_type"),
    (struct.pack("<IBBHIQ", 0x424C494E, 1, 0x30, 0, 2**32 - 1, 1), "frame_too_large"),
    (struct.pack("<IBBHIQ", 0x424C494E, 1, 0x10, 0, 1025, 1), "frame_too_large"),
])
def test_bad_headers_after_handshake(server, bad, code):
    server.receive_data(HS)
    server.accept()
    server.data_to_send()
    ev = server.receive_data(encode_frame(0x30, 1, b"ok") + bad)
    assert frames_of(ev) == [(0x30, 1, b"ok")]
    assert isinstance(ev[-1], Violation) and ev[-1].error.code == code
    (err,) = server.data_to_send()
    got_code, message = parse_error_payload(err[20:])
    assert got_code == code and message
    assert server.state is State.CLOSED


def test_frame_too_large_allocates_nothing(server):
    server.receive_data(HS)
    server.accept()
    before = len(server.rx.buf)
    server.receive_data(struct.pack("<IBBHIQ", 0x424C494E, 1, 0x10, 0, 2**32 - 1, 7))
    assert len(server.rx.buf) == before


def test_heartbeat_echo_and_pong_not_answered(server):
    server.receive_data(HS)
    server.accept()
    server.data_to_send()
    ev = server.receive_data(encode_frame(2, 77) + encode_frame(2, 78, b"pong"))
    assert [type(e) for e in ev] == [Ping, Pong]
    assert server.data_to_send() == [encode_frame(2, 77, b"pong")]


def test_client_side_and_remote_error(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl)
    c.send_handshake(b'{"role":"client"}')
    assert c.data_to_send()[0][5] == 1
    ev = c.receive_data(encode_frame(3, 0, b'{"code":"bad_token","message":"no"}'))
    assert isinstance(ev[0], RemoteErrorEvent) and (ev[0].code, ev[0].message) == ("bad_token", "no")
    assert c.state is State.CLOSED


def test_split_feeding_one_byte_at_a_time(server):
    data = HS + encode_frame(0x30, 5, b"x" * 100) + encode_frame(0x10, 6, b'{"method":"m"}')
    ev = []
    for i in range(len(data)):
        ev += server.receive_data(data[i:i + 1])
        if any(isinstance(e, Handshake) for e in ev) and server.state is State.HANDSHAKE:
            server.accept()
            ev += server.resume()
    assert frames_of(ev) == [(0x30, 5, b"x" * 100), (0x10, 6, b'{"method":"m"}')]


def test_cut_through_large_stream_frames(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl, max_payload=1 << 20, cut_through=1024)
    c.send_handshake()
    c.receive_data(encode_frame(1, 1, b"ready"))
    payload = bytes(range(256)) * 40  # 10240 bytes
    data = encode_frame(0x30, 9, payload) + encode_frame(0x31, 9, b"tail")
    got, starts = bytearray(), []
    for i in range(0, len(data), 700):
        for ev in c.receive_data(data[i:i + 700]):
            if isinstance(ev, StreamStart):
                starts.append((ev.msg_type, ev.request_id, ev.length))
                got += ev.data[20:]
            elif isinstance(ev, StreamChunk):
                got += ev.data
            elif isinstance(ev, (StreamRun, Frame)):
                got += b"|" + bytes(frames_of([ev])[0][2])
    assert starts == [(0x30, 9, len(payload))]
    assert bytes(got) == payload + b"|tail"
    assert len(c.rx.buf) <= 4096  # the big frame never needed a big buffer


def test_control_frames_are_whole_even_when_large(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl, max_payload=1 << 20, cut_through=1024)
    c.send_handshake()
    c.receive_data(encode_frame(1, 1, b""))
    body = b'{"method":"x","params":"' + b"a" * 50000 + b'"}'
    data = encode_frame(0x10, 4, body)
    ev = []
    for i in range(0, len(data), 999):
        ev += c.receive_data(data[i:i + 999])
    assert frames_of(ev) == [(0x10, 4, body)]


def test_live_slices_are_never_overwritten(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl)
    c.send_handshake()
    c.receive_data(encode_frame(1, 1, b""))
    kept = []
    for i in range(200):
        for ev in c.receive_data(encode_frame(0x30, i, b"%06d" % i)):
            kept.append((i, ev))  # like a transport that has not written yet
    for i, ev in kept:
        assert frames_of([ev]) == [(0x30, i, b"%06d" % i)]


def test_buffer_shrinks_back_when_idle(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl, max_payload=1 << 20, cut_through=1 << 20)
    c.send_handshake()
    c.receive_data(encode_frame(1, 1, b""))
    c.receive_data(encode_frame(0x10, 1, b"{" + b" " * 100000 + b"}"))
    assert len(c.rx.buf) > 100000
    c.rx.shrink()
    assert len(c.rx.buf) == 4096


def test_stream_run_is_one_slice(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl)
    c.send_handshake()
    c.receive_data(encode_frame(1, 1, b""))
    data = b"".join(encode_frame(0x30 + (i % 2), i, b"p" * i) for i in range(50))
    ev = c.receive_data(data)
    assert len(ev) == 1 and isinstance(ev[0], StreamRun) and ev[0].count == 50
    assert bytes(ev[0].data) == data
    assert ev[0].type_mask == frames.TYPE_BIT[0x30] | frames.TYPE_BIT[0x31]


def test_buffer_grows_for_fast_senders_and_pins_survive_growth(codec_impl):
    c = Connection(Side.CLIENT, codec_impl=codec_impl, initial_buffer=2048, cut_through=1 << 20)
    c.send_handshake()
    c.receive_data(encode_frame(1, 1, b""))
    kept, sizes = [], set()
    for round_ in range(30):
        batch = b"".join(encode_frame(0x30, round_ * 1000 + i, b"%06d" % i) for i in range(400))
        dst = c.get_buffer()
        sizes.add(len(c.rx.buf))
        n = min(len(dst), len(batch))
        dst[:n] = batch[:n]
        del dst
        evs = c.buffer_updated(n)
        evs += c.receive_data(batch[n:])
        kept.append((round_, evs))
    assert max(sizes) > 2048  # reads that fill the buffer make it grow
    for round_, evs in kept:
        got = frames_of(evs)
        assert got == [(0x30, round_ * 1000 + i, b"%06d" % i) for i in range(400)]
    c.rx.shrink()
    assert c.rx.target == 2048
