"""The client library's request lane (``Client._request_lane``): a read batch
that starts with RpcRequests is served straight from the receive buffer. It
must answer exactly what the generic path (``Client._frame``) answers, in the
same order, whatever the read boundaries, and leave everything it does not
serve (other frame types, notifications, bad payloads, bad headers) to the
scanner. Each scenario runs against a real Unix socket with the lane on and
with it off, and both are checked against the expected answers."""

from __future__ import annotations

import asyncio
import json
import random
import struct

import pytest
from harness import T, frame, header

from vhubd.client import Client, Event, Output
from vhubd.frames import DEFAULT_MAX_PAYLOAD

BIG = (1 << 63) | 11
BULK = range(100, 150)


def rq(rid: int, body) -> bytes:
    return frame(T.RPC_REQUEST, rid, body if isinstance(body, bytes) else json.dumps(body).encode())


def script() -> bytes:
    """Every kind of request a handler meets, the ordinary ones in bulk."""
    parts = [
        rq(1, {"method": "echo", "params": {"n": 1}}),
        rq(2, {"method": "x.any", "params": 2}),
        rq(3, {"method": "missing"}),
        rq(4, {"method": "boom"}),
        rq(5, {"method": "later", "params": 5}),
        rq(0, {"method": "vhub.event", "params": {"type": "note"}}),
        rq(0, {"method": "count", "params": "notified"}),  # a notification to a handler: no answer
        rq(6, b"[1, 2]"),
        rq(7, b"{not json"),
        rq(8, {"params": 1}),
        rq(12, {"method": 5}),
        frame(T.STDOUT, 9, b"out"),
        rq(10, {"event": "echo", "params": 10}),
        frame(T.RPC_RESPONSE, 999, b"{}"),  # an answer to nothing: ignored
        rq(BIG, {"method": "echo", "params": "big"}),
    ]
    parts += [rq(rid, {"method": "count", "params": rid}) for rid in BULK]
    return b"".join(parts)


EXPECTED = {
    1: (T.RPC_RESPONSE, {"n": 1}),
    2: (T.RPC_RESPONSE, {"pattern": 2}),
    3: (T.RPC_ERROR, "no_handler"),
    4: (T.RPC_ERROR, "handler_failed"),
    5: (T.RPC_RESPONSE, 5),
    6: (T.RPC_ERROR, "bad_request"),
    7: (T.RPC_ERROR, "bad_request"),
    8: (T.RPC_ERROR, "bad_request"),
    12: (T.RPC_ERROR, "bad_request"),
    10: (T.RPC_RESPONSE, 10),
    BIG: (T.RPC_RESPONSE, "big"),
    **{rid: (T.RPC_RESPONSE, rid) for rid in BULK},
}


def parse(raw: bytes) -> list:
    """(type, request_id, JSON payload) of every frame in ``raw``."""
    out, pos = [], 0
    while len(raw) - pos >= 20:
        _, _, mtype, _, length, rid = struct.unpack_from("<IBBHIQ", raw, pos)
        assert len(raw) - pos - 20 >= length, "a frame cut short"
        out.append((mtype, rid, json.loads(raw[pos + 20:pos + 20 + length])))
        pos += 20 + length
    assert pos == len(raw)
    return out


async def accept_handshake(reader, writer) -> None:
    """The daemon's side of the handshake: read the client's, answer ok."""
    hs = await reader.readexactly(20)
    await reader.readexactly(int.from_bytes(hs[8:12], "little"))
    writer.write(frame(T.HANDSHAKE, 1, {"ok": True}))
    await writer.drain()


async def serve_script(tmp_path, lane: bool, data: bytes, cuts: list[int], want: int):
    """A daemon stand-in: answers the handshake, writes ``data`` cut at
    ``cuts``, and reads the client's frames until ``want`` answers came (or
    the connection ends). Returns (answers, queued items, handler calls,
    closed_reason code)."""
    path = str(tmp_path / f"lane-{int(lane)}.sock")
    calls: list = []
    got = bytearray()
    done = asyncio.Event()

    async def later(p):
        await asyncio.sleep(0.01)
        return p

    def boom(p):
        raise ValueError("no")

    def count(p):
        calls.append(p)
        return p

    async def daemon(reader, writer):
        await accept_handshake(reader, writer)
        await ready.wait()
        last = 0
        for cut in [*cuts, len(data)]:
            writer.write(data[last:cut])
            await writer.drain()
            await asyncio.sleep(0.002)  # let the client read this piece on its own
            last = cut
        while len(parse_whole(got)) < want:
            chunk = await reader.read(1 << 16)
            if not chunk:
                break
            got.extend(chunk)
        done.set()
        writer.close()

    ready = asyncio.Event()
    server = await asyncio.start_unix_server(daemon, path)
    async with server:
        c = await Client.connect(path, session="s", serve={"echo": lambda p: p, "x.*": lambda p: {"pattern": p},
                                                            "boom": boom, "later": later, "count": count})
        if not lane:
            c._conn.set_fast_lane(frozenset(), None)
        ready.set()
        await asyncio.wait_for(done.wait(), 20)
        await asyncio.sleep(0.05)
        items = c.drain()
        reason = c.closed_reason.code if c.closed_reason else None
        await c.close()
    return parse_whole(got), items, calls, reason


def frame_ends(data: bytes) -> list[int]:
    ends, pos = [], 0
    while pos < len(data):
        pos += 20 + int.from_bytes(data[pos + 8:pos + 12], "little")
        ends.append(pos)
    return ends


def parse_whole(buf: bytearray) -> list:
    """Frames of the complete prefix of ``buf``."""
    pos = 0
    while len(buf) - pos >= 20:
        length = int.from_bytes(buf[pos + 8:pos + 12], "little")
        if len(buf) - pos - 20 < length:
            break
        pos += 20 + length
    return parse(bytes(buf[:pos]))


def check(answers: list, items: list, calls: list) -> None:
    by_rid = {rid: (mtype, body if mtype == T.RPC_RESPONSE else body["code"]) for mtype, rid, body in answers}
    assert by_rid == EXPECTED
    assert len(answers) == len(EXPECTED), "one answer per request"
    # every answer but the coroutine's comes in request order
    sync = [rid for _, rid, _ in answers if rid != 5]
    assert sync == [rid for rid in EXPECTED if rid != 5]
    assert calls == ["notified", *BULK]
    events = [i.data for i in items if type(i) is Event]
    outputs = [(i.kind, i.request_id, i.data) for i in items if type(i) is Output]
    assert events == [{"type": "note"}]
    assert outputs == [("stdout", 9, b"out")]


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "generic"])
@pytest.mark.parametrize("cutting", ["whole", "random", "every-byte-early", "each-frame"])
def test_requests_answered_alike_whatever_the_reads(tmp_path, lane, cutting):
    data = script()
    if cutting == "whole":
        cuts: list[int] = []
    elif cutting == "random":
        cuts = sorted(random.Random(11).sample(range(1, len(data)), 40))
    elif cutting == "every-byte-early":  # the first frames a byte at a time: every partial header and payload
        cuts = list(range(1, 120))
    else:  # every frame first in its read: the lane decides on each one
        cuts = frame_ends(data)[:-1]
    answers, items, calls, reason = asyncio.run(serve_script(tmp_path, lane, data, cuts, len(EXPECTED)))
    check(answers, items, calls)
    assert reason == "closed"


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "generic"])
@pytest.mark.parametrize("bad, code", [
    (header(T.RPC_REQUEST, 2, 20, magic=0x11223344) + b"{}", "bad_magic"),
    (header(T.RPC_REQUEST, 2, 20, version=2) + b"{}", "bad_version"),
    (header(T.RPC_REQUEST, DEFAULT_MAX_PAYLOAD + 1, 20), "frame_too_large"),
    (header(0x7F, 2, 20) + b"{}", "unknown_type"),
], ids=["magic", "version", "too-large", "type"])
def test_a_bad_header_after_requests_is_reported_not_served(tmp_path, lane, bad, code):
    """The bad header is the scanner's to report (the lane stops there): the
    daemon is told why, and the connection ends. The requests before it in
    the same read: the lane has answered them before the scanner reached the
    bad header; the generic path sees the violation first and sends nothing
    after its Error frame (it used to crash its read loop trying)."""
    data = rq(1, {"method": "echo", "params": 1}) + rq(2, {"method": "echo", "params": 2}) + bad
    answered = [(T.RPC_RESPONSE, 1, 1), (T.RPC_RESPONSE, 2, 2)] if lane else []
    frames, _, _, reason = asyncio.run(serve_script(tmp_path, lane, data, [], len(answered) + 1))
    assert frames[:len(answered)] == answered
    assert [(m, body["code"]) for m, _, body in frames[len(answered):]] == [(T.ERROR, code)]
    assert reason == code


def test_requests_in_separate_reads_before_a_bad_header_are_answered_either_way(tmp_path):
    """What the daemon wrote and the client read before the bad header is
    answered on both paths."""
    data = rq(1, {"method": "echo", "params": 1}) + header(0x7F, 0, 20)
    for lane in (True, False):
        frames, _, _, reason = asyncio.run(serve_script(tmp_path, lane, data, [len(data) - 20], 2))
        assert frames == [(T.RPC_RESPONSE, 1, 1), (T.ERROR, 0, frames[1][2])] and frames[1][2]["code"] == "unknown_type"
        assert reason == "unknown_type"


def test_the_lane_takes_only_complete_frames_whatever_lies_past_the_end(tmp_path):
    """Called on a buffer whose bytes past ``end`` would complete the frame
    (a reused receive buffer holds such stale bytes), the lane stops at the
    last complete frame: it never reads past what arrived."""

    async def body():
        path = str(tmp_path / "direct.sock")

        async def daemon(reader, writer):
            await accept_handshake(reader, writer)
            await reader.read()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_unix_server(daemon, path)
        async with server:
            calls = []
            c = await Client.connect(path, session="s", serve={"count": lambda p: calls.append(p) or p})
            one, two = rq(1, {"method": "count", "params": 1}), rq(2, {"method": "count", "params": 2})
            buf = bytearray(one + two + bytes(64))
            for end in range(len(one) + len(two)):
                calls.clear()
                want = len(one) if end >= len(one) else 0
                assert c._request_lane(buf, 0, end, DEFAULT_MAX_PAYLOAD) == (want, 1 if want else 0), end
                assert calls == ([1] if want else [])
            assert c._request_lane(buf, 0, len(one) + len(two), DEFAULT_MAX_PAYLOAD) == (len(one) + len(two), 2)
            # a limit below the payload's length: the scanner's to refuse
            assert c._request_lane(buf, 0, len(buf), len(one) - 21) == (0, 0)
            await c.close()

    asyncio.run(body())
