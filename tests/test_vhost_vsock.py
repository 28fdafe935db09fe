"""The virtio-vsock device logic (vhubd.vhost.vsock), without QEMU or memory:
header layout, connection state machine, credit accounting both ways."""

import struct

import pytest

from vhubd.vhost.vsock import (
    HEADER_SIZE,
    HOST_CID,
    MAX_PACKET_PAYLOAD,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Closed,
    ConnState,
    Data,
    Header,
    Op,
    Opened,
    PacketError,
    PeerShutdown,
    VsockDevice,
    pack_header,
    parse_header,
)

GUEST = 3
PORT = 10000


def pkt(op, src_port=5000, dst_port=PORT, payload=b"", *, flags=0, buf_alloc=256 * 1024, fwd_cnt=0,
        src_cid=GUEST, dst_cid=HOST_CID, type_=TYPE_STREAM, length=None):
    h = pack_header(src_cid, dst_cid, src_port, dst_port, len(payload) if length is None else length, type_, op,
                    flags, buf_alloc, fwd_cnt)
    return h, payload


def drain(dev, room=HEADER_SIZE + 4096):
    out = []
    while True:
        p = dev.next_packet(room)
        if p is None:
            return out
        h, pieces = p
        out.append((parse_header(h), b"".join(bytes(x) for x in pieces)))


def connect(dev, src_port=5000, **kw):
    ev = dev.receive(*pkt(Op.REQUEST, src_port, **kw))
    assert [type(e) for e in ev] == [Opened]
    (resp, _), = drain(dev)
    assert resp.op == Op.RESPONSE
    return ev[0].conn


def test_header_is_44_bytes_little_endian_in_spec_order():
    raw = pack_header(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert len(raw) == HEADER_SIZE == 44
    assert raw == struct.pack("<QQIIIHHIII", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    h = parse_header(raw + b"payload")
    assert h == Header(1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert (h.src_cid, h.dst_port, h.len, h.op, h.fwd_cnt) == (1, 4, 5, 7, 10)
    with pytest.raises(PacketError):
        parse_header(raw[:43])


def test_request_to_listened_port_gets_response_with_our_credit():
    dev = VsockDevice(GUEST, buf_alloc=1 << 20)
    ev = dev.receive(*pkt(Op.REQUEST, 4242))
    assert isinstance(ev[0], Opened) and ev[0].conn.guest_port == 4242
    (h, payload), = drain(dev)
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (HOST_CID, GUEST, PORT, 4242)
    assert (h.op, h.type, h.len, h.buf_alloc, h.fwd_cnt) == (Op.RESPONSE, TYPE_STREAM, 0, 1 << 20, 0)
    assert payload == b""


def test_other_ports_and_unknown_connections_get_rst():
    dev = VsockDevice(GUEST)
    assert dev.receive(*pkt(Op.REQUEST, 1, dst_port=22)) == []
    assert dev.receive(*pkt(Op.RW, 2, payload=b"x")) == []
    assert dev.receive(*pkt(Op.RST, 3)) == []  # an RST is never answered
    out = drain(dev)
    assert [(h.op, h.dst_port, h.src_port) for h, _ in out] == [(Op.RST, 1, 22), (Op.RST, 2, PORT)]
    assert dev.counters["refused"] == 1 and dev.counters["resets_sent"] == 2


def test_packets_not_addressed_host_from_this_guest_are_dropped():
    dev = VsockDevice(GUEST)
    assert dev.receive(*pkt(Op.REQUEST, src_cid=7)) == []
    assert dev.receive(*pkt(Op.REQUEST, dst_cid=5)) == []
    assert drain(dev) == [] and dev.counters["dropped"] == 2


def test_data_flows_in_and_credit_returns_only_when_consumed():
    dev = VsockDevice(GUEST, buf_alloc=1000, credit_update_threshold=400)
    conn = connect(dev)
    ev = dev.receive(*pkt(Op.RW, payload=b"a" * 300))
    assert [type(e) for e in ev] == [Data] and bytes(ev[0].data) == b"a" * 300
    assert conn.unconsumed == 300
    assert drain(dev) == []  # nothing consumed: no credit update
    conn.consumed(300)
    assert drain(dev) == []  # below the threshold
    dev.receive(*pkt(Op.RW, payload=b"b" * 200))
    conn.consumed(200)
    (h, _), = drain(dev)
    assert (h.op, h.fwd_cnt, h.buf_alloc) == (Op.CREDIT_UPDATE, 500, 1000)


def test_guest_exceeding_its_credit_is_reset():
    dev = VsockDevice(GUEST, buf_alloc=1000)
    conn = connect(dev)
    dev.receive(*pkt(Op.RW, payload=b"x" * 600))
    ev = dev.receive(*pkt(Op.RW, payload=b"y" * 500))
    assert isinstance(ev[0], Closed) and "credit" in ev[0].reason
    assert conn.state is ConnState.CLOSED and dev.conns == {}
    (h, _), = drain(dev)
    assert h.op == Op.RST and dev.counters["violations"] == 1


def test_credit_request_is_answered():
    dev = VsockDevice(GUEST, buf_alloc=4096)
    conn = connect(dev)
    dev.receive(*pkt(Op.RW, payload=b"z" * 100))
    conn.consumed(100)
    dev.receive(*pkt(Op.CREDIT_REQUEST))
    (h, _), = drain(dev)
    assert (h.op, h.fwd_cnt, h.buf_alloc) == (Op.CREDIT_UPDATE, 100, 4096)


def test_we_never_send_beyond_the_guests_credit():
    dev = VsockDevice(GUEST)
    conn = connect(dev, buf_alloc=10000, fwd_cnt=0)
    conn.send(b"q" * 25000)
    out = drain(dev, room=HEADER_SIZE + 4096)
    data = [(h, p) for h, p in out if h.op == Op.RW]
    assert sum(len(p) for _, p in data) == 10000
    assert all(len(p) <= 4096 for _, p in data)  # and never more than the rx buffer holds
    assert out[-1][0].op == Op.CREDIT_REQUEST  # out of credit: ask once
    assert conn.peer_credit() == 0 and conn.tx_bytes == 15000
    assert drain(dev) == []
    # the guest read 6000 bytes and says so
    dev.receive(*pkt(Op.CREDIT_UPDATE, buf_alloc=10000, fwd_cnt=6000))
    out = drain(dev)
    assert sum(len(p) for h, p in out if h.op == Op.RW) == 6000
    # a bigger window and an update carried by a data packet
    dev.receive(*pkt(Op.RW, payload=b"", buf_alloc=100000, fwd_cnt=16000))
    out = drain(dev, room=HEADER_SIZE + MAX_PACKET_PAYLOAD + 100)
    assert sum(len(p) for h, p in out if h.op == Op.RW) == 9000
    assert conn.tx_bytes == 0 and conn.tx_cnt == 25000


def test_sent_bytes_arrive_in_order_across_pieces_and_packets():
    dev = VsockDevice(GUEST)
    conn = connect(dev, buf_alloc=1 << 20)
    chunks = [bytes([i]) * (i * 37 % 5000 + 1) for i in range(60)]
    for c in chunks:
        conn.send(memoryview(c))
    conn.send(bytearray(b"tail"))
    out = drain(dev, room=HEADER_SIZE + 3000)
    assert b"".join(p for h, p in out if h.op == Op.RW) == b"".join(chunks) + b"tail"
    assert all(h.op == Op.RW and len(p) <= 3000 for h, p in out)
    assert all(h.fwd_cnt == 0 and h.buf_alloc == dev.buf_alloc for h, _ in out)


def test_round_robin_between_connections():
    dev = VsockDevice(GUEST)
    a = connect(dev, 1, buf_alloc=1 << 20)
    b = connect(dev, 2, buf_alloc=1 << 20)
    a.send(b"a" * 10000)
    b.send(b"b" * 10000)
    out = drain(dev, room=HEADER_SIZE + 1000)
    ports = [h.dst_port for h, _ in out]
    assert ports[:4] == [1, 2, 1, 2]


def test_guest_shutdown_then_our_close_sends_rst():
    dev = VsockDevice(GUEST)
    conn = connect(dev)
    ev = dev.receive(*pkt(Op.SHUTDOWN, flags=SHUTDOWN_SEND))
    assert [type(e) for e in ev] == [PeerShutdown] and ev[0].flags == SHUTDOWN_SEND
    assert dev.receive(*pkt(Op.SHUTDOWN, flags=SHUTDOWN_SEND)) == []  # nothing new
    ev = dev.receive(*pkt(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert ev[0].flags == SHUTDOWN_BOTH
    conn.send(b"lost")  # the guest receives no more: dropped
    conn.close()  # the guest stopped receiving: nothing to flush, RST now
    assert conn.state is ConnState.CLOSED
    (h, _), = drain(dev)
    assert h.op == Op.RST and dev.conns == {}


def test_data_after_the_guest_shut_down_sending_is_a_violation():
    dev = VsockDevice(GUEST)
    connect(dev)
    dev.receive(*pkt(Op.SHUTDOWN, flags=SHUTDOWN_SEND))
    ev = dev.receive(*pkt(Op.RW, payload=b"late"))
    assert isinstance(ev[0], Closed)


def test_our_graceful_close_flushes_then_shutdown_then_guest_rst():
    dev = VsockDevice(GUEST)
    conn = connect(dev, buf_alloc=1 << 20)
    conn.send(b"x" * 5000)
    conn.close()
    conn.send(b"ignored after close")
    out = drain(dev)
    assert [h.op for h, _ in out] == [Op.RW, Op.RW, Op.SHUTDOWN]
    assert out[-1][0].flags == SHUTDOWN_BOTH and sum(len(p) for _, p in out) == 5000
    assert conn.state is ConnState.CLOSING
    ev = dev.receive(*pkt(Op.RST))
    assert isinstance(ev[0], Closed) and ev[0].reason == "closed" and dev.conns == {}


def test_our_close_answered_by_guest_shutdown_ends_with_our_rst():
    dev = VsockDevice(GUEST)
    conn = connect(dev)
    conn.close()
    drain(dev)
    ev = dev.receive(*pkt(Op.SHUTDOWN, flags=SHUTDOWN_BOTH))
    assert [type(e) for e in ev] == [PeerShutdown, Closed]
    (h, _), = drain(dev)
    assert h.op == Op.RST and conn.state is ConnState.CLOSED


def test_abort_and_guest_reset():
    dev = VsockDevice(GUEST)
    a = connect(dev, 1)
    b = connect(dev, 2)
    a.send(b"dropped")
    a.abort()
    out = drain(dev)
    assert [h.op for h, _ in out] == [Op.RST]
    ev = dev.receive(*pkt(Op.RST, 2))
    assert isinstance(ev[0], Closed) and ev[0].conn is b and "reset" in ev[0].reason
    assert dev.conns == {}


def test_protocol_violations_on_established_connections():
    for bad in (pkt(Op.RESPONSE), pkt(Op.REQUEST), pkt(99), pkt(Op.RW, payload=b"ab", length=5),
                pkt(Op.RW, type_=2)):
        dev = VsockDevice(GUEST)
        connect(dev)
        ev = dev.receive(*bad)
        assert isinstance(ev[0], Closed), bad
        assert [h.op for h, _ in drain(dev)] == [Op.RST]


def test_reset_drops_everything_silently():
    dev = VsockDevice(GUEST)
    a = connect(dev, 1)
    a.send(b"pending")
    dev.receive(*pkt(Op.REQUEST, 2))
    gone = dev.reset()
    assert {c.guest_port for c in gone} == {1, 2}
    assert drain(dev) == [] and not dev.has_output()


def test_counters_wrap_like_the_spec_u32():
    dev = VsockDevice(GUEST, buf_alloc=1000)
    conn = connect(dev, buf_alloc=1000, fwd_cnt=0xFFFFFF00)
    conn.tx_cnt = 0xFFFFFF00  # as if 4 GiB minus 256 bytes were already sent and acknowledged
    conn.send(b"w" * 2000)
    out = drain(dev)
    assert sum(len(p) for h, p in out if h.op == Op.RW) == 1000
    assert conn.tx_cnt == (0xFFFFFF00 + 1000) & 0xFFFFFFFF
    conn.rx_cnt = conn.fwd_cnt = conn.fwd_cnt_sent = 0xFFFFFFF0
    dev.receive(*pkt(Op.RW, payload=b"r" * 100))
    conn.consumed(100)
    assert conn.fwd_cnt == (0xFFFFFFF0 + 100) & 0xFFFFFFFF and conn.unconsumed == 0


def test_has_output_matches_next_packet():
    dev = VsockDevice(GUEST)
    assert not dev.has_output() and dev.next_packet() is None
    conn = connect(dev, buf_alloc=0)
    conn.send(b"x")
    assert dev.has_output()  # a CREDIT_REQUEST
    assert dev.next_packet()[0][30:32] == struct.pack("<H", Op.CREDIT_REQUEST)
    assert not dev.has_output() and dev.next_packet() is None
