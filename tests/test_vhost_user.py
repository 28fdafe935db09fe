"""The vhost-user back-end (vhubd.vhost.vhost_user): message framing, feature
negotiation, the memory table (a real memfd, mmap'ed), vring lifecycle and
fds, the config space. No QEMU: messages are built as QEMU builds them."""

import mmap
import os
import struct

import pytest

from vhubd.vhost.device import VsockVhostDevice
from vhubd.vhost.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    HEADER_SIZE,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
    Listener,
    Message,
    MessageReader,
    ProtocolFeature,
    Request,
    VhostUserBackend,
    VhostUserError,
    encode,
)


def msg(req, payload=b"", fds=(), need_reply=False):
    return Message(int(req), FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload, list(fds))


def reply_body(raw):
    req, flags, size = struct.unpack_from("<III", raw)
    assert flags == FLAG_VERSION | FLAG_REPLY and size == len(raw) - HEADER_SIZE
    return req, raw[HEADER_SIZE:]


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class Recorder(Listener):
    def __init__(self):
        self.resets = []
        self.changes = 0

    def vrings_changed(self):
        self.changes += 1

    def device_reset(self, reason):
        self.resets.append(reason)


def backend(**kw):
    rec = Recorder()
    b = VhostUserBackend(device_features=0, protocol_features=int(ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG),
                         config=struct.pack("<Q", 7), num_queues=3, listener=rec)
    return b, rec


@pytest.mark.parametrize("split", [None, 1])
def test_reader_frames_messages_whole_or_byte_by_byte(split):
    stream = encode(Request.GET_FEATURES) + encode(Request.SET_FEATURES, struct.pack("<Q", 5)) + encode(
        Request.SET_VRING_NUM, struct.pack("<II", 1, 256))
    r = MessageReader()
    got = []
    pos = 0
    while pos < len(stream):
        n = r.want() if split is None else 1
        assert n >= 1
        m = r.feed(stream[pos:pos + n], [])
        pos += n
        if m:
            got.append((m.request, m.payload))
    assert got == [(1, b""), (2, struct.pack("<Q", 5)), (8, struct.pack("<II", 1, 256))]


def test_reader_rejects_oversized_and_wrong_version_from_the_header():
    r = MessageReader(max_payload=64)
    with pytest.raises(VhostUserError, match="65 payload bytes"):
        r.feed(struct.pack("<III", 5, 1, 65))
    fd = os.eventfd(0)
    with pytest.raises(VhostUserError, match="version 2"):
        MessageReader().feed(struct.pack("<III", 1, 2, 0), [fd])
    assert not is_open(fd)  # the fds of a rejected message are closed


def test_feature_negotiation_and_config_space():
    b, _ = backend()
    _, body = reply_body(b.handle(msg(Request.GET_FEATURES)))
    feats = struct.unpack("<Q", body)[0]
    assert feats & VIRTIO_F_VERSION_1 and feats & VHOST_USER_F_PROTOCOL_FEATURES
    _, body = reply_body(b.handle(msg(Request.GET_PROTOCOL_FEATURES)))
    assert struct.unpack("<Q", body)[0] == ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
    assert b.handle(msg(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0xFFFF))) is None
    assert b.acked_protocol_features == ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
    # with REPLY_ACK negotiated, NEED_REPLY gets an ack
    req, body = reply_body(b.handle(msg(Request.SET_OWNER, need_reply=True)))
    assert (req, body) == (Request.SET_OWNER, struct.pack("<Q", 0))
    _, body = reply_body(b.handle(msg(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))))
    assert body == struct.pack("<III", 0, 8, 0) + struct.pack("<Q", 7)
    _, body = reply_body(b.handle(msg(Request.GET_QUEUE_NUM)))
    assert struct.unpack("<Q", body)[0] == 3
    with pytest.raises(VhostUserError):
        b.handle(msg(Request.SET_FEATURES, struct.pack("<Q", 1 << 5)))  # never offered
    b.handle(msg(Request.SET_FEATURES, struct.pack("<Q", feats)))
    assert b.acked_features == feats


def test_unsupported_requests_are_refused_politely():
    b, _ = backend()
    b.handle(msg(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", ProtocolFeature.REPLY_ACK)))
    fd = os.eventfd(0)
    req, body = reply_body(b.handle(msg(Request.SET_LOG_FD, b"", [fd], need_reply=True)))
    assert struct.unpack("<Q", body)[0] != 0 and not is_open(fd)
    req, body = reply_body(b.handle(msg(999, b"", need_reply=True)))
    assert req == 999 and struct.unpack("<Q", body)[0] == 1


def make_memfd(size=1 << 20):
    fd = os.memfd_create("t")
    os.ftruncate(fd, size)
    view = mmap.mmap(fd, size)
    return fd, view


def test_mem_table_maps_the_fds_and_translates():
    b, rec = backend()
    fd, view = make_memfd()
    view[0x2000:0x2005] = b"guest"
    table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0x100000, 0x80000, 0x7F0000000000, 0x1000)
    b.handle(msg(Request.SET_MEM_TABLE, table, [os.dup(fd)]))
    assert bytes(b.mem.gpa(0x101000, 5)) == b"guest"  # mmap_offset 0x1000 skipped
    assert bytes(b.mem.uva(0x7F0000001000, 5)) == b"guest"
    b.mem.gpa(0x100000, 2)[:] = b"hi"
    assert view[0x1000:0x1002] == b"hi"  # shared memory, both ways
    with pytest.raises(VhostUserError):
        b.handle(msg(Request.SET_MEM_TABLE, struct.pack("<II", 0, 0), []))
    with pytest.raises(VhostUserError, match="2 memory regions but 1 file"):
        b.handle(msg(Request.SET_MEM_TABLE, struct.pack("<II", 2, 0) + bytes(64), [os.dup(fd)]))
    b.close()
    view.close()
    os.close(fd)


def start_ring(b, index, fd_mem, num=8, *, enable=True):
    kick, call = os.eventfd(0), os.eventfd(0)
    b.handle(msg(Request.SET_VRING_NUM, struct.pack("<II", index, num)))
    b.handle(msg(Request.SET_VRING_BASE, struct.pack("<II", index, 5)))
    base = 0x7F0000000000 + 0x10000 * (index + 1)
    b.handle(msg(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, base, base + 0x2000, base + 0x1000, 0)))
    b.handle(msg(Request.SET_VRING_KICK, struct.pack("<Q", index), [kick]))
    b.handle(msg(Request.SET_VRING_CALL, struct.pack("<Q", index), [call]))
    if enable:
        b.handle(msg(Request.SET_VRING_ENABLE, struct.pack("<II", index, 1)))
    return kick, call


def test_vring_lifecycle_and_fd_ownership():
    b, rec = backend()
    fd, view = make_memfd()
    b.handle(msg(Request.GET_FEATURES))
    b.handle(msg(Request.SET_FEATURES, struct.pack("<Q", VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)))
    b.handle(msg(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20,
                                                                               0x7F0000000000, 0), [os.dup(fd)]))
    kick, call = start_ring(b, 1, fd, enable=False)
    v = b.vrings[1]
    assert v.started and v.queue is not None and not v.running  # protocol features: disabled until enabled
    b.handle(msg(Request.SET_VRING_ENABLE, struct.pack("<II", 1, 1)))
    assert v.running and v.queue.last_avail == 5
    # a new kick fd replaces the old one, which is closed once the I/O layer lets go
    kick2 = os.eventfd(0)
    b.handle(msg(Request.SET_VRING_KICK, struct.pack("<Q", 1), [kick2]))
    assert v.kick == kick2 and is_open(kick)
    b.close_retired()
    assert not is_open(kick)
    # GET_VRING_BASE stops the ring and reports where it was
    req, body = reply_body(b.handle(msg(Request.GET_VRING_BASE, struct.pack("<II", 1, 0))))
    assert struct.unpack("<II", body) == (1, 5)
    assert not v.running and rec.resets
    # no-fd call (polling), and out of range indices
    b.handle(msg(Request.SET_VRING_CALL, struct.pack("<Q", 1 | 0x100)))
    assert v.call is None
    with pytest.raises(VhostUserError):
        b.handle(msg(Request.SET_VRING_NUM, struct.pack("<II", 9, 8)))
    with pytest.raises(VhostUserError):
        b.handle(msg(Request.SET_VRING_NUM, struct.pack("<II", 0, 100)))
    with pytest.raises(VhostUserError, match="without a file descriptor"):
        b.handle(msg(Request.SET_VRING_KICK, struct.pack("<Q", 0)))
    b.close()
    assert not is_open(kick2) and not is_open(call)
    view.close()
    os.close(fd)


def test_reset_owner_forgets_everything():
    b, rec = backend()
    fd, view = make_memfd()
    b.handle(msg(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 1 << 20,
                                                                               0x7F0000000000, 0), [os.dup(fd)]))
    kick, call = start_ring(b, 0, fd)
    b.handle(msg(Request.RESET_OWNER))
    assert b.mem is None and not b.vrings[0].started and rec.resets
    b.close_retired()
    assert not is_open(kick) and not is_open(call)
    view.close()
    os.close(fd)


def test_device_config_is_the_guest_cid():
    dev = VsockVhostDevice(42)
    raw = dev.handle_message(msg(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)))
    assert raw[HEADER_SIZE + 12:] == struct.pack("<Q", 42)
