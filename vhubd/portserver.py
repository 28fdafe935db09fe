"""The host side of exposed ports: TCP listeners and their connections.

An I/O module beside ``server.py`` (which owns BLIN connections): it touches
plain TCP transports only, and does what the relay decides. Each listener is
an ``Exposure`` (``relay.exposures``); each accepted connection is a
``TcpEnd``, the host end of one channel (``relay.channels``):

- bytes it reads go to the agent as StreamData, at most the channel's window
  beyond what the agent reported consumed: reading pauses there, so a slow
  guest program slows only its own connection;
- bytes from the agent are written to the socket and reported consumed as the
  kernel takes them, so a client that never reads holds at most one window;
- a half-close either way is a half-close the other way (``write_eof``); a
  reset either way is a reset (``SO_LINGER`` 0, then abort) the other way.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Any

from . import frames
from .relay import Relay
from .relay.exposures import Exposure

log = logging.getLogger("vhubd")
WINDOW = frames.CHANNEL_WINDOW
CHUNK = frames.CHANNEL_FRAME
_LINGER0 = struct.pack("ii", 1, 0)


class TcpEnd(asyncio.Protocol):
    """One accepted connection of an exposed port: the host end of its channel."""

    def __init__(self, relay: Relay, exposure: Exposure):
        self.relay = relay
        self.channels = relay.channels
        self.exposure = exposure
        self.transport: Any = None
        self.channel: Any = None
        self.written = 0  # guest -> client bytes handed to the transport
        self.acked = 0  # of those, reported consumed to the agent
        self.read_paused = False
        self.is_open = False  # the agent connected in the guest
        self.g_eof = False
        self.h_eof = False
        self.finished = False
        self.early: list[bytes] = []  # read before the guest side connected (one read: reading pauses)
        self.unsent = bytearray()  # read, beyond the agent's window: sent as acks come
        self.eof_sent = False

    # -- asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WINDOW // 4, low=WINDOW // 8)
        transport.pause_reading()  # until the guest side is connected
        self.read_paused = True
        self.exposure.ends.add(self)
        try:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self.channel = self.relay.exposures.accepted(self.exposure, self)

    def data_received(self, data: bytes) -> None:
        ch = self.channel
        if ch is None or ch.closed:
            return
        if not self.is_open:  # uvloop may read once before pause_reading() takes
            self.early.append(data)
            self.read_paused = False
            self._pause()
            return
        self.exposure.bytes_in += len(data)
        self.unsent += data
        self._send()

    def _send(self) -> None:
        """What was read, to the agent, within its window; reading pauses while it is full
        (what one read brought beyond the window waits here: at most one read)."""
        ch = self.channel
        while self.unsent and not ch.closed:
            room = ch.window - (ch.h_sent - ch.h_acked)
            if room <= 0:
                break
            n = min(room, CHUNK, len(self.unsent))
            self.channels.host_data(ch, bytes(self.unsent[:n]))
            del self.unsent[:n]
        if self.unsent or ch.h_sent - ch.h_acked >= ch.window:
            self._pause()
        if not self.unsent and self.h_eof and not self.eof_sent and not ch.closed:
            self.eof_sent = True
            self.channels.host_eof(ch)

    def eof_received(self) -> bool:
        self.h_eof = True
        if self.channel is not None and self.is_open and not self.unsent and not self.eof_sent:
            self.eof_sent = True
            self.channels.host_eof(self.channel)
        if self.g_eof:
            self._finish()
        return True  # keep the other direction open (a half-close)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        self._ack(force=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.exposure.ends.discard(self)
        ch = self.channel
        if ch is not None and not ch.closed:
            why = "reset" if exc is not None else "closed"
            self.channels.host_reset(ch, f"the host's client {why} the connection")
        self.finished = True

    # -- from the relay (the channel's host end)
    def opened(self) -> None:
        self.is_open = True
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)
        ch = self.channel
        if ch is None or ch.closed or self.finished:
            return
        if self.h_eof and not self.unsent and not self.eof_sent:
            self.eof_sent = True
            self.channels.host_eof(ch)
        if not self.unsent and ch.h_sent - ch.h_acked < ch.window:
            self._resume()

    def data(self, frame: memoryview, payload: memoryview) -> None:
        if self.finished or self.transport.is_closing():
            return
        n = len(payload)
        self.transport.write(bytes(payload))
        self.written += n
        self.exposure.bytes_out += n
        self._ack(force=False)

    def eof(self, frame: memoryview) -> None:
        self.g_eof = True
        if self.finished or self.transport.is_closing():
            return
        if self.h_eof:
            self._finish()
        elif self.transport.can_write_eof():
            self.transport.write_eof()

    def ack(self, consumed: int) -> None:
        ch = self.channel
        if ch is None or not self.is_open or self.finished:
            return
        self._send()
        if self.read_paused and not self.h_eof and not self.unsent and ch.h_sent - ch.h_acked < ch.window:
            self._resume()

    def reset(self, reason: str) -> None:
        """Abort with a TCP reset (the guest refused, reset, or went)."""
        if self.finished:
            return
        self.finished = True
        t = self.transport
        try:
            sock = t.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        t.abort()

    def done(self, params: dict) -> None:
        """Only copies end with ``chan.done``; the relay sends it to client ends only."""

    # -- internals
    def _ack(self, force: bool) -> None:
        ch = self.channel
        if ch is None or ch.closed:
            return
        consumed = self.written - self.transport.get_write_buffer_size()
        if consumed > self.acked and (force or consumed - self.acked >= WINDOW // 4):
            self.acked = consumed
            self.channels.host_ack(ch, consumed)

    def _pause(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.read_paused and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    def _finish(self) -> None:
        """Both directions ended: flush and close."""
        self.finished = True
        self.transport.close()


class PortServer:
    """Opens and closes the listeners of exposures (``relay.exposures.Opener``)."""

    def __init__(self, relay: Relay, loop: asyncio.AbstractEventLoop):
        self.relay = relay
        self.loop = loop
        self.servers: set = set()

    def listen(self, host: str, port: int, exposure: Exposure) -> asyncio.Future:
        async def bind() -> tuple:
            server = await self.loop.create_server(lambda: TcpEnd(self.relay, exposure), host, port,
                                                   reuse_address=True, backlog=1024)
            exposure.listener = server
            self.servers.add(server)
            bound = server.sockets[0].getsockname()
            exposure.port = bound[1]
            return bound

        return asyncio.ensure_future(bind())

    def close(self, exposure: Exposure) -> None:
        server = exposure.listener
        if server is not None:
            exposure.listener = None
            self.servers.discard(server)
            server.close()
        for end in list(exposure.ends):
            end.reset("the exposure was removed")
            end.connection_lost(None)

    def close_all(self) -> None:
        for server in list(self.servers):
            server.close()
        self.servers.clear()
