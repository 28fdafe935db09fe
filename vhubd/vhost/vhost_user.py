"""The vhost-user protocol, back-end side (QEMU docs/interop/vhost-user.rst).

``MessageReader`` frames the byte stream (12-byte header: request, flags,
size; then the payload) and keeps the file descriptors that came with each
message. ``VhostUserBackend`` answers the front-end (QEMU): feature
negotiation, ownership, the memory table (mmap'ed here), vring setup and
lifecycle, the config space. It tells its ``listener`` when a vring starts or
stops and when memory changes; it does not read sockets or eventfds itself.

Vring lifecycle (the spec's rules): a ring *starts* when it has a kick fd and
addresses, and *stops* at GET_VRING_BASE; with VHOST_USER_F_PROTOCOL_FEATURES
negotiated a ring also needs SET_VRING_ENABLE 1 before it is processed.

About 480 lines, on purpose: every vhost-user message and its handling in one
table-like place, as the spec lists them; split, the vring rules would scatter.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
from collections.abc import Sequence

from ..errors import GuestMemoryError, VhostUserError, VirtqError
from .virtq import GuestMemory, SplitQueue

log = logging.getLogger("vhubd")

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 4096  # the largest message we accept (SET_MEM_TABLE with 8 regions is 264 bytes)
MAX_FDS = 32

FLAG_VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32
VRING_NOFD = 1 << 8
VRING_IDX_MASK = 0xFF


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# requests whose answer is a message of the same type (not a REPLY_ACK)
_REPLIES = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
                      Request.GET_CONFIG, Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS})


class Message:
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]):
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    def __repr__(self) -> str:
        return f"Message({self.name}, flags=0x{self.flags:x}, {len(self.payload)} bytes, fds={self.fds})"


def encode(request: int, payload: bytes = b"", flags: int = FLAG_VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


class MessageReader:
    """Frames the stream into messages. Ask ``want()`` how many bytes to read
    next, so a read never crosses a message boundary and the fds received
    with it belong to the message being read."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size: int | None = None  # payload size, once the header is in

    def want(self) -> int:
        if self._size is None:
            return HEADER_SIZE - len(self._buf)
        return HEADER_SIZE + self._size - len(self._buf)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> Message | None:
        """Bytes (at most ``want()``) and the fds that came with them."""
        self._fds.extend(fds)
        self._buf += data
        if self._size is None and len(self._buf) >= HEADER_SIZE:
            request, flags, size = HEADER.unpack_from(self._buf)
            if size > self.max_payload:
                self.close_fds()
                raise VhostUserError(f"vhost-user message {request} announces {size} payload bytes "
                                     f"(limit {self.max_payload})")
            if flags & FLAG_VERSION_MASK != FLAG_VERSION:
                self.close_fds()
                raise VhostUserError(f"vhost-user message {request} has version {flags & FLAG_VERSION_MASK}, "
                                     "expected 1")
            self._size = size
        if self._size is not None and len(self._buf) >= HEADER_SIZE + self._size:
            request, flags, _ = HEADER.unpack_from(self._buf)
            msg = Message(request, flags, bytes(self._buf[HEADER_SIZE:HEADER_SIZE + self._size]), self._fds)
            self._buf = self._buf[HEADER_SIZE + self._size:]
            self._fds = []
            self._size = None
            return msg
        return None

    def close_fds(self) -> None:
        for fd in self._fds:
            _close(fd)
        self._fds = []


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class Vring:
    """What the front-end told us about one vring."""

    __slots__ = ("index", "num", "desc", "used", "avail", "base", "kick", "call", "err", "enabled", "started",
                 "queue")

    def __init__(self, index: int):
        self.index = index
        self.num = 0
        self.desc = self.used = self.avail = None
        self.base = 0
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.started = False
        self.queue: SplitQueue | None = None

    @property
    def running(self) -> bool:
        return self.started and self.enabled and self.queue is not None

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            _close(getattr(self, name))
            setattr(self, name, None)


class Listener:
    """What the backend tells the device (override what you need)."""

    def vrings_changed(self) -> None:
        """A vring started, stopped, was enabled/disabled or got new fds."""

    def device_reset(self, reason: str) -> None:
        """The front-end reset the device (RESET_OWNER, RESET_DEVICE, or a
        stop of the rings): every connection over it is gone."""


class VhostUserBackend:
    """The back-end's side of one vhost-user connection.

    ``handle(msg)`` returns the reply bytes (or None) and raises
    VhostUserError for messages that make the connection unusable.
    """

    def __init__(self, *, device_features: int, protocol_features: int, config: bytes, num_queues: int,
                 listener: Listener | None = None):
        self.device_features = device_features | VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES
        self.protocol_features = protocol_features
        self.config = bytearray(config)
        self.num_queues = num_queues
        self.listener = listener or Listener()
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.features_set = False
        self.owner = False
        self.mem: GuestMemory | None = None
        self.vrings = [Vring(i) for i in range(num_queues)]
        self.messages = 0
        self.retired: list[int] = []  # replaced eventfds, closed by close_retired() once the I/O layer let go

    # -- dispatch --
    def handle(self, msg: Message) -> bytes | None:
        self.messages += 1
        try:
            req = Request(msg.request)
        except ValueError:
            req = None
        handler = getattr(self, f"_{req.name.lower()}", None) if req is not None else None
        if handler is None:
            for fd in msg.fds:
                _close(fd)
            log.warning("vhost-user: unsupported %s ignored", msg.name)
            return self._ack(msg, 1)
        try:
            result = handler(msg)
        except (struct.error, GuestMemoryError, VirtqError, IndexError) as exc:
            raise VhostUserError(f"bad {msg.name}: {exc}") from None
        if req in _REPLIES:
            return encode(msg.request, result, FLAG_VERSION | FLAG_REPLY)
        return self._ack(msg, 0)

    def _ack(self, msg: Message, status: int) -> bytes | None:
        if msg.flags & FLAG_NEED_REPLY and self.acked_protocol_features & ProtocolFeature.REPLY_ACK:
            return encode(msg.request, struct.pack("<Q", status), FLAG_VERSION | FLAG_REPLY)
        return None

    @staticmethod
    def _one_fd(msg: Message) -> int | None:
        fds = msg.fds
        for fd in fds[1:]:
            _close(fd)
        return fds[0] if fds else None

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < self.num_queues:
            raise VhostUserError(f"vring index {index} out of range (the device has {self.num_queues})")
        return self.vrings[index]

    # -- features and ownership --
    def _get_features(self, msg: Message) -> bytes:
        return struct.pack("<Q", self.device_features)

    def _set_features(self, msg: Message) -> None:
        (features,) = struct.unpack_from("<Q", msg.payload)
        if features & ~self.device_features:
            raise VhostUserError(f"front-end acked features 0x{features:x} beyond the offered 0x{self.device_features:x}")
        self.acked_features = features
        self.features_set = True
        if not features & VHOST_USER_F_PROTOCOL_FEATURES:
            for v in self.vrings:  # without protocol features, rings are enabled from the start
                v.enabled = True

    def _get_protocol_features(self, msg: Message) -> bytes:
        return struct.pack("<Q", self.protocol_features)

    def _set_protocol_features(self, msg: Message) -> None:
        (features,) = struct.unpack_from("<Q", msg.payload)
        self.acked_protocol_features = features & self.protocol_features

    def _get_queue_num(self, msg: Message) -> bytes:
        return struct.pack("<Q", self.num_queues)

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        self.reset("the front-end reset the owner")

    def _reset_device(self, msg: Message) -> None:
        self.reset("the front-end reset the device")

    def reset(self, reason: str) -> None:
        """Back to the state of a fresh connection (rings stopped, memory
        unmapped); the listener hears about it first."""
        self.listener.device_reset(reason)
        for i, v in enumerate(self.vrings):
            self._stop(v)
            for fd in (v.kick, v.call, v.err):
                self._retire(fd)
            self.vrings[i] = Vring(i)
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.acked_features = 0
        self.features_set = False
        self.listener.vrings_changed()

    # -- memory --
    def _set_mem_table(self, msg: Message) -> None:
        nregions, _ = struct.unpack_from("<II", msg.payload)
        if not 0 < nregions <= 8:
            for fd in msg.fds:
                _close(fd)
            raise VhostUserError(f"SET_MEM_TABLE with {nregions} regions")
        table = [struct.unpack_from("<QQQQ", msg.payload, 8 + 32 * i) for i in range(nregions)]
        mem = GuestMemory.from_fds(table, msg.fds)
        old, self.mem = self.mem, mem
        for v in self.vrings:  # rings live in guest memory: rebuild their views on the new mapping
            if v.started:
                self._build(v)
        if old is not None:
            old.close()
        log.debug("vhost-user memory table: %s", mem.regions)
        self.listener.vrings_changed()

    # -- vrings --
    def _set_vring_num(self, msg: Message) -> None:
        index, num = struct.unpack_from("<II", msg.payload)
        v = self._vring(index)
        if not 0 < num <= 32768 or num & (num - 1):
            raise VhostUserError(f"vring {index}: size {num} is not a power of two up to 32768")
        v.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        index, _flags, desc, used, avail, _log = struct.unpack_from("<IIQQQQ", msg.payload)
        v = self._vring(index)
        v.desc, v.used, v.avail = desc, used, avail
        if v.started:
            self._build(v)
            self.listener.vrings_changed()

    def _set_vring_base(self, msg: Message) -> None:
        index, base = struct.unpack_from("<II", msg.payload)
        self._vring(index).base = base & 0xFFFF

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = struct.unpack_from("<II", msg.payload)
        v = self._vring(index)
        base = v.queue.last_avail if v.queue is not None else v.base
        was_running = v.running
        self._stop(v)
        v.base = base
        self._retire(v.kick)
        v.kick = None
        if was_running:
            self.listener.device_reset(f"the front-end stopped vring {index}")
        self.listener.vrings_changed()
        return struct.pack("<II", index, base)

    def _set_vring_kick(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        self._retire(v.kick)
        v.kick = fd
        if fd is None:
            raise VhostUserError("polling mode (no kick fd) is not supported")
        v.started = True
        self._build(v)
        self.listener.vrings_changed()

    def _set_vring_call(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        self._retire(v.call)
        v.call = fd
        self.listener.vrings_changed()

    def _set_vring_err(self, msg: Message) -> None:
        v, fd = self._vring_fd(msg)
        self._retire(v.err)
        v.err = fd

    def _vring_fd(self, msg: Message) -> tuple[Vring, int | None]:
        (value,) = struct.unpack_from("<Q", msg.payload)
        fd = self._one_fd(msg)
        try:
            v = self._vring(value & VRING_IDX_MASK)
        except VhostUserError:
            _close(fd)
            raise
        if value & VRING_NOFD:
            _close(fd)
            fd = None
        elif fd is None:
            raise VhostUserError(f"{msg.name} for vring {value & VRING_IDX_MASK} without a file descriptor")
        return v, fd

    def _set_vring_enable(self, msg: Message) -> None:
        index, enable = struct.unpack_from("<II", msg.payload)
        v = self._vring(index)
        v.enabled = bool(enable)
        self.listener.vrings_changed()

    def _build(self, v: Vring) -> None:
        if v.queue is not None:
            v.base = v.queue.last_avail
            v.queue.release()
            v.queue = None
        if self.mem is None or v.desc is None or not v.num:
            return  # not yet: SET_MEM_TABLE / SET_VRING_ADDR will build it
        v.queue = SplitQueue.from_uva(self.mem, v.num, v.desc, v.avail, v.used, v.base)

    def _stop(self, v: Vring) -> None:
        v.started = False
        if v.queue is not None:
            v.base = v.queue.last_avail
            v.queue.release()
            v.queue = None

    # -- config space --
    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags = struct.unpack_from("<III", msg.payload)
        if size > 256:
            raise VhostUserError(f"GET_CONFIG of {size} bytes")
        data = bytes(self.config[offset:offset + size]).ljust(size, b"\0")
        return struct.pack("<III", offset, size, flags) + data

    def _set_config(self, msg: Message) -> None:
        pass  # the vsock config (guest_cid) is read-only

    # -- what the front-end may send but we did not offer --
    def _set_vring_endian(self, msg: Message) -> None:
        raise VhostUserError("SET_VRING_ENDIAN: only little-endian (VERSION_1) rings are supported")

    def _retire(self, fd: int | None) -> None:
        if fd is not None:
            self.retired.append(fd)

    def close_retired(self) -> None:
        """Close replaced eventfds (the I/O layer has stopped watching them)."""
        retired, self.retired = self.retired, []
        for fd in retired:
            _close(fd)

    def close(self) -> None:
        """The connection is gone: stop everything, release fds and memory."""
        for v in self.vrings:
            self._stop(v)
            v.close_fds()
        self.close_retired()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
