"""Sans-I/O BLIN connection: bytes in, events and bytes out.

Everything that decides what a received byte means lives here: the
handshake-first rule, header validation (through ``vhubd.codec``), the payload
limit, heartbeat answers, Error frames on violations, and cut-through of large
stream frames. No sockets, no asyncio: the daemon, the client library and the
tests all drive this same object.

Receive path without copies: the connection owns its receive buffer. The I/O
layer asks ``get_buffer()`` for a writable memoryview, reads into it, and calls
``buffer_updated(n)``; the events it gets back carry memoryview slices of that
buffer. A buffer that still has live slices (a transport that has not yet
written them, say) is *pinned*: the connection never overwrites it and reads
into a fresh one instead (a live slice keeps its bytearray alive). Plain
``receive_data(bytes)`` feeds the same path for callers that have bytes.

Events, one shape per kind of frame:

- ``StreamRun``: every Stdout/Stderr/StreamData frame arrives in a run of
  consecutive stream frames (``count`` >= 1), as one slice of the receive
  buffer (headers included) that a relay forwards with one write; iterate
  ``run.frames()`` for the frames, each a ``Frame``.
- ``Frame``: any other frame after the handshake (RPC, TtyResize).
- ``StreamStart`` + ``StreamChunk``s: a stream frame larger than the
  connection's ``cut_through`` size, forwarded while it arrives (only the
  daemon's guest connections enable it).
- ``Handshake``, ``Ping``, ``Pong``, ``RemoteErrorEvent``, ``Violation``.

Every frame the package sends is built here: ``encode_frame`` and the
builders below it (``rpc_request``, ``rpc_result``, ``rpc_error``,
``notification``, ``error_frame``, ``heartbeat``).
"""

from .buffer import ReceiveBuffer
from .build import (
    encode_frame,
    error_frame,
    error_payload,
    heartbeat,
    notification,
    parse_error_payload,
    rpc_error,
    rpc_request,
    rpc_result,
)
from .connection import Connection, shared_scanner
from .events import (
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
)

__all__ = ["Connection", "Frame", "Handshake", "Ping", "Pong", "ReceiveBuffer", "RemoteErrorEvent", "Side", "State",
           "StreamChunk", "StreamRun", "StreamStart", "Violation", "encode_frame", "error_frame", "error_payload",
           "heartbeat", "notification", "parse_error_payload", "rpc_error", "rpc_request", "rpc_result",
           "shared_scanner"]
