"""The thin I/O layer of the vhost-user vsock device.

``VhostUserVsockService`` puts one VM's device on the event loop: it reads
vhost-user messages (with their fds) from the socket QEMU talks to, watches
the vrings' kick eventfds, and signals their call eventfds. Each guest vsock
connection becomes a ``VsockTransport``, an ``asyncio.Transport`` over the
device, so the daemon's ordinary protocol object (``server.Peer``) serves it
exactly as it serves a socket: no socket in between, and flow control maps
onto the transport interface:

- the protocol's ``pause_reading`` stops handing it bytes; they wait here and
  the guest's credit is not returned, so the guest stops after ``buf_alloc``;
- writes queue on the vsock connection and leave within the guest's credit;
  above the write high-water mark the protocol gets ``pause_writing``.

About 450 lines, on purpose: the transport and the service drive each other
(credit, kicks, pending data) and read best side by side.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections import deque
from collections.abc import Callable

from .device import RX_QUEUE, TX_QUEUE, VsockVhostDevice
from .vhost_user import MAX_FDS, MessageReader, VhostUserError
from .vsock import SHUTDOWN_SEND, Closed, ConnState, Data, Opened, PeerShutdown, VsockConnection

log = logging.getLogger("vhubd")
_ONE = (1).to_bytes(8, "little")
CLOSE_TIMEOUT = 10.0  # a guest that never answers our SHUTDOWN gets an RST after this long


class VsockTransport(asyncio.Transport):
    """One guest vsock connection seen as an asyncio transport."""

    def __init__(self, service: VhostUserVsockService, conn: VsockConnection):
        super().__init__(extra={"peername": (service.guest_cid, conn.guest_port),
                                "sockname": (2, conn.host_port), "socket": None})
        self._service = service
        self._conn = conn
        self._protocol: asyncio.BaseProtocol | None = None
        self._buffered = False
        self._reading = True
        self._pending: deque[bytes] = deque()
        self._eof = False
        self._closing = False
        self._lost = False
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._close_timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<VsockTransport {self._conn!r}>"

    # -- asyncio.Transport --
    def set_protocol(self, protocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self):
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def is_reading(self) -> bool:
        return self._reading and not self.is_closing()

    def write(self, data) -> None:
        if self._closing or self._lost:
            return
        self._conn.send(data)
        self._service.schedule_pump()
        self._check_high()

    def writelines(self, list_of_data) -> None:
        if self._closing or self._lost:
            return
        for data in list_of_data:
            self._conn.send(data)
        self._service.schedule_pump()
        self._check_high()

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._conn.tx_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        self._high, self._low = high, low
        self._check_high()

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if self._reading or self._lost:
            return
        self._reading = True
        self._deliver_pending()
        self._service.schedule_pump()  # credit updates for what was just consumed

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._conn.close()
        self._service.schedule_pump()
        if self._conn.state is ConnState.CLOSED:  # nothing left to say (the guest stopped receiving)
            self._service.loop.call_soon(self._connection_lost, None)
        else:
            self._close_timer = self._service.loop.call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._conn.abort()
        self._service.schedule_pump()
        self._service.loop.call_soon(self._connection_lost, None)

    # -- from the service --
    def _data(self, payload) -> None:
        if self._lost:
            return
        if self._reading and not self._pending:
            self._feed(payload)
        else:
            self._pending.append(bytes(payload))

    def _feed(self, payload) -> None:
        """Hand bytes to the protocol (one copy: guest memory -> its buffer)."""
        proto = self._protocol
        conn = self._conn
        mv = memoryview(payload)
        if not self._buffered:
            proto.data_received(bytes(mv))  # type: ignore[union-attr]
            conn.consumed(len(mv))
            return
        while mv:
            buf = proto.get_buffer(len(mv))  # type: ignore[union-attr]
            n = min(len(buf), len(mv))
            buf[:n] = mv[:n]
            del buf
            proto.buffer_updated(n)  # type: ignore[union-attr]
            conn.consumed(n)
            mv = mv[n:]
            if mv and (not self._reading or self._lost):
                if not self._lost:
                    self._pending.append(bytes(mv))  # it paused us mid-packet
                return

    def _deliver_pending(self) -> None:
        while self._pending and self._reading and not self._lost:
            self._feed(self._pending.popleft())
        if self._eof:
            self._maybe_eof()

    def _peer_shutdown(self, flags: int) -> None:
        if flags & SHUTDOWN_SEND and not self._eof:
            self._eof = True
            self._maybe_eof()

    def _maybe_eof(self) -> None:
        if self._pending or not self._reading or self._lost or self._closing:
            return
        keep_open = self._protocol.eof_received()  # type: ignore[union-attr]
        if not keep_open:
            self.close()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._service.transports.discard(self)
        self._service.write_paused.discard(self)
        if self._conn.state is not ConnState.CLOSED:
            self._conn.abort()
            self._service.schedule_pump()
        self._pending.clear()
        try:
            self._protocol.connection_lost(exc)  # type: ignore[union-attr]
        except Exception:
            log.exception("connection_lost of %r", self)

    def _check_high(self) -> None:
        if not self._write_paused and self._conn.tx_bytes > self._high and not self._lost:
            self._write_paused = True
            self._service.write_paused.add(self)
            try:
                self._protocol.pause_writing()  # type: ignore[union-attr]
            except Exception:
                log.exception("pause_writing of %r", self)

    def _check_low(self) -> None:
        if self._write_paused and self._conn.tx_bytes <= self._low:
            self._write_paused = False
            self._service.write_paused.discard(self)
            if not self._lost:
                try:
                    self._protocol.resume_writing()  # type: ignore[union-attr]
                except Exception:
                    log.exception("resume_writing of %r", self)


class VhostUserVsockService:
    """One VM's vsock device on the event loop.

    ``sock`` is the connected vhost-user socket (QEMU at the other end);
    ``protocol_factory`` makes the protocol for each accepted guest
    connection. ``done`` resolves with a reason when QEMU goes away.
    """

    def __init__(self, sock: socket.socket, *, guest_cid: int, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 loop: asyncio.AbstractEventLoop | None = None, ports=(10000,), label: str = "vsock",
                 buf_alloc: int | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.sock = sock
        self.guest_cid = guest_cid
        self.protocol_factory = protocol_factory
        self.label = label
        kw = {"buf_alloc": buf_alloc} if buf_alloc else {}
        self.device = VsockVhostDevice(guest_cid, ports, **kw)
        self.reader = MessageReader()
        self.transports: set[VsockTransport] = set()
        self.write_paused: set[VsockTransport] = set()
        self.done: asyncio.Future = self.loop.create_future()
        self.closed = False
        self.ready = False  # the guest's driver started the rings
        self._kicks: dict[int, int] = {}  # vring index -> fd we watch
        self._pump_scheduled = False
        self._tx_scheduled = False

    def start(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._on_socket)

    # -- vhost-user messages --
    def _on_socket(self) -> None:
        try:
            for _ in range(64):
                want = self.reader.want()
                try:
                    data, anc, flags, _ = self.sock.recvmsg(want, socket.CMSG_SPACE(MAX_FDS * 4))
                except (BlockingIOError, InterruptedError):
                    return
                fds = _fds(anc)
                if flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise VhostUserError("too many file descriptors in one message")
                if not data:
                    for fd in fds:
                        os.close(fd)
                    self.close("QEMU closed the vhost-user connection")
                    return
                msg = self.reader.feed(data, fds)
                if msg is None:
                    continue
                log.debug("vhost-user %s <- %r", self.label, msg)
                reply = self.device.handle_message(msg)
                if reply:
                    self.sock.send(reply)  # small, and QEMU waits for it: never blocks in practice
                self._after_message()
        except VhostUserError as exc:
            log.warning("vhost-user %s: %s; dropping the connection", self.label, exc)
            self.close(f"vhost-user protocol error: {exc}")
        except OSError as exc:
            self.close(f"vhost-user socket error: {exc}")
        except Exception:
            log.exception("vhost-user %s: internal error", self.label)
            self.close("internal error in the vsock device")

    def _after_message(self) -> None:
        self._drop_lost()
        if self.device.vrings_dirty:
            self.device.vrings_dirty = False
            self._sync_kicks()
            self.device.backend.close_retired()
            self.schedule_pump()
            self._schedule_tx()
            ready = self.device.queue(RX_QUEUE) is not None and self.device.queue(TX_QUEUE) is not None
            if ready and not self.ready:
                log.info("vsock device %s ready: guest cid %d", self.label, self.guest_cid)
            self.ready = ready

    def _drop_lost(self) -> None:
        lost, reason = self.device.take_lost()
        for conn in lost:
            t = conn.user
            if t is not None:
                t._connection_lost(ConnectionResetError(f"vsock device reset: {reason}"))

    def _sync_kicks(self) -> None:
        want = {}
        for v in self.device.backend.vrings:
            if v.running and v.kick is not None:
                want[v.index] = v.kick
        for index, fd in list(self._kicks.items()):
            if want.get(index) != fd:
                self.loop.remove_reader(fd)
                del self._kicks[index]
        for index, fd in want.items():
            if index not in self._kicks:
                os.set_blocking(fd, False)
                self.loop.add_reader(fd, self._on_kick, index, fd)
                self._kicks[index] = fd

    # -- the data path --
    def _on_kick(self, index: int, fd: int) -> None:
        try:
            os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self.close(f"kick eventfd of vring {index}: {exc}")
            return
        if index == TX_QUEUE:
            self._process_tx()
        self.schedule_pump()

    def _schedule_tx(self) -> None:
        if not self._tx_scheduled:
            self._tx_scheduled = True
            self.loop.call_soon(self._process_tx)

    def _process_tx(self) -> None:
        self._tx_scheduled = False
        if self.closed:
            return
        try:
            notify, more = self.device.process_tx(self._on_events)
        except Exception as exc:
            log.exception("vsock %s: tx queue", self.label)
            self.close(f"vsock tx queue: {exc}")
            return
        if notify:
            self._call(TX_QUEUE)
        if more:
            self._schedule_tx()
        self.schedule_pump()

    def _on_events(self, events: list) -> None:
        for ev in events:
            t = type(ev)
            if t is Data:
                ev.conn.user._data(ev.data)
            elif t is Opened:
                self._open(ev.conn)
            elif t is PeerShutdown:
                if ev.conn.user is not None:
                    ev.conn.user._peer_shutdown(ev.flags)
            elif t is Closed:
                if ev.conn.user is not None:
                    exc = None if ev.reason == "closed" else ConnectionResetError(ev.reason)
                    ev.conn.user._connection_lost(exc)

    def _open(self, conn: VsockConnection) -> None:
        transport = VsockTransport(self, conn)
        try:
            protocol = self.protocol_factory()
        except Exception:
            log.exception("vsock %s: protocol factory", self.label)
            conn.abort()
            return
        conn.user = transport
        transport.set_protocol(protocol)
        self.transports.add(transport)
        protocol.connection_made(transport)

    def schedule_pump(self) -> None:
        if not self._pump_scheduled and not self.closed:
            self._pump_scheduled = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_scheduled = False
        if self.closed:
            return
        try:
            if self.device.fill_rx():
                self._call(RX_QUEUE)
        except Exception as exc:
            log.exception("vsock %s: rx queue", self.label)
            self.close(f"vsock rx queue: {exc}")
            return
        for t in list(self.write_paused):
            t._check_low()

    def _call(self, index: int) -> None:
        fd = self.device.backend.vrings[index].call
        if fd is not None:
            try:
                os.write(fd, _ONE)
            except (BlockingIOError, InterruptedError):
                pass  # the counter is saturated: the guest is notified anyway
            except OSError as exc:
                log.debug("vsock %s: call eventfd of vring %d: %s", self.label, index, exc)

    # -- teardown --
    def close(self, reason: str = "closed") -> None:
        """Drop the vhost-user connection and everything over it."""
        if self.closed:
            return
        self.closed = True
        for fd in self._kicks.values():
            self.loop.remove_reader(fd)
        self._kicks.clear()
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        lost = self.device.close()
        for conn in lost:
            if conn.user is not None:
                conn.user._connection_lost(ConnectionResetError(f"vsock device gone: {reason}"))
        for t in list(self.transports):
            t._connection_lost(ConnectionResetError(f"vsock device gone: {reason}"))
        self.reader.close_fds()
        self.sock.close()
        log.info("vsock device %s closed: %s", self.label, reason)
        if not self.done.done():
            self.done.set_result(reason)

    def stats(self) -> dict:
        return {"guest_cid": self.guest_cid, "connections": len(self.transports), "ready": self.ready,
                **self.device.vsock.counters}


def _fds(ancdata) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[:len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds
