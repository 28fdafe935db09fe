"""One agent-side BLIN connection as a state machine (sans-I/O).

Everything that decides what a received frame means lives here: the handshake,
heartbeat answers, JSON decoding of RPC frames, the ``vhub.hello`` / ``vhub.ack``
notifications and protocol violations. The I/O layer feeds received bytes to
:meth:`AgentConnection.receive_data`, acts on the returned events and writes
:meth:`AgentConnection.data_to_send`. Nothing here touches a socket or a loop.

States: ``handshake`` (ours sent, waiting for the daemon's) -> ``open`` -> ``closed``.

This module is also the agent's one frame producer: every frame the agent sends is
built here, either queued by :class:`AgentConnection` or, for the buffered output
that the I/O layer writes header and payload apart (zero copy), as the header from
:func:`stream_header` / the chunks from :func:`stream_chunks`. RpcError codes have one
spelling per meaning both ways (:func:`~blink_agent.errors.canonical_code`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, NamedTuple, Union

from ._version import __version__
from .errors import ProtocolError, canonical_code
from .wire import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, FrameDecoder, MsgType, encode_frame, encode_header

__all__ = [
    "READY_PAYLOAD",
    "PONG",
    "handshake_payload",
    "stream_header",
    "stream_chunks",
    "AgentConnection",
    "Ready",
    "Rejected",
    "RemoteError",
    "Request",
    "Response",
    "ErrorReply",
    "Hello",
    "Ack",
    "Pong",
    "StreamIn",
    "Ignored",
    "Violation",
]

READY_PAYLOAD = b"blink-vhub-ready"
PONG = b"pong"
HANDSHAKE_ID = 1


def handshake_payload(
    session: str | None, token: str | None, *, ack: bool = True, pid: int | None = None,
    attach: bool = False,
) -> bytes:
    """The guest handshake payload: the JSON object of the V-Hub guest
    handshake; without a session it names none (the anonymous session: Blink's
    hosts ignore the payload) and is empty when it would say nothing at all.
    ``attach`` marks a secondary connection of a program inside the guest (it
    makes RPCs and sends output; the resident agent stays the session's agent)."""
    if not session and not ack:
        return b""
    body = {
        "agent": "blink-agent",
        "pid": os.getpid() if pid is None else pid,
        "version": __version__,
    }  # type: dict[str, Any]
    if session:
        body["session"] = session
        body["token"] = token or ""
    if ack:
        body["ack"] = True
    if attach:
        body["attach"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def stream_header(msg_type: int, request_id: int, payload_len: int) -> bytes:
    """The 20 header bytes of one buffered output frame (Stdout, Stderr, StreamData,
    or the ``output_dropped`` notification), for a writer that sends the payload
    after it without copying it into one buffer."""
    return encode_header(msg_type, request_id, payload_len)


def stream_chunks(frames: Iterable[tuple[int, int, bytes]]) -> tuple[list[bytes], int]:
    """Header, payload, header, payload... for ``writelines`` from ``(msg_type,
    request_id, payload)`` frames (``OutFrame``), and the number of bytes they make.
    Payloads are not copied."""
    chunks: list[bytes] = []
    nbytes = 0
    for msg_type, request_id, payload in frames:
        chunks.append(stream_header(msg_type, request_id, len(payload)))
        chunks.append(payload)
        nbytes += HEADER_SIZE + len(payload)
    return chunks, nbytes


# -- events -------------------------------------------------------------------------


class Ready(NamedTuple):
    """The daemon accepted the handshake; ``payload`` is what it sent."""

    payload: bytes


class Rejected(NamedTuple):
    """The daemon answered the handshake with an Error frame."""

    code: str
    message: str


class RemoteError(NamedTuple):
    """An Error frame after the handshake: the daemon is closing the connection."""

    code: str
    message: str


class Request(NamedTuple):
    """A host->guest RpcRequest; ``request_id`` 0 is a notification (no reply)."""

    request_id: int
    method: str
    params: Any


class Response(NamedTuple):
    request_id: int
    result: Any


class ErrorReply(NamedTuple):
    """An RpcError answering one of our calls; ``code`` is canonical
    (``no_such_method`` arrives as ``no_handler``, ``handler_error`` as ``handler_failed``)."""

    request_id: int
    code: str
    message: str


class Hello(NamedTuple):
    """``vhub.hello``: the daemon will ack stream frames on this connection."""

    params: Any


class Ack(NamedTuple):
    """``vhub.ack``: cumulative count of stream frames delivered on this connection."""

    frames: int


class Pong(NamedTuple):
    request_id: int


class StreamIn(NamedTuple):
    """StreamData or TtyResize from the host."""

    msg_type: int
    request_id: int
    payload: bytes


class Ignored(NamedTuple):
    """A frame that was dropped on purpose; ``reason`` is worth a debug log."""

    reason: str


class Violation(NamedTuple):
    """The daemon broke the protocol; an Error frame is queued and the state is closed."""

    code: str
    message: str


Event = Union[
    Ready,
    Rejected,
    RemoteError,
    Request,
    Response,
    ErrorReply,
    Hello,
    Ack,
    Pong,
    StreamIn,
    Ignored,
    Violation,
]


def _error_fields(payload: bytes) -> tuple[str, str]:
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return "unknown", payload.decode("utf-8", "replace")
    if not isinstance(obj, dict):
        return "unknown", str(obj)
    return str(obj.get("code", "unknown")), str(obj.get("message", ""))


class AgentConnection:
    """The agent side of one connection to the daemon."""

    def __init__(self, handshake: bytes = b"", *, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.state = "handshake"
        self.handshake_reply: bytes | None = None
        self._decoder = FrameDecoder(max_payload)
        self._outgoing = bytearray(encode_frame(MsgType.Handshake, HANDSHAKE_ID, handshake))

    # -- output ---------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes queued for the daemon since the last call."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def _queue(self, msg_type: int, request_id: int, payload: bytes = b"") -> None:
        if self.state != "closed":
            self._outgoing += encode_frame(msg_type, request_id, payload)

    def send_request(self, request_id: int, method: str, params: Any = None) -> None:
        """Queue a guest->host request (``request_id`` 0: a notification)."""
        self._queue(MsgType.RpcRequest, request_id, _dumps({"method": method, "params": params}))

    def send_event(self, request_id: int, body: dict) -> None:
        """Queue a Blink-style ``{"event": ...}`` request or notification."""
        self._queue(MsgType.RpcRequest, request_id, _dumps(body))

    def send_response(self, request_id: int, result: Any) -> None:
        self._queue(MsgType.RpcResponse, request_id, _dumps(result))

    def send_error(self, request_id: int, code: str, message: str) -> None:
        """Queue an RpcError; an old spelling of ``code`` goes out as the canonical one."""
        self._queue(
            MsgType.RpcError, request_id, _dumps({"code": canonical_code(code), "message": message})
        )

    def send_ping(self, request_id: int) -> None:
        self._queue(MsgType.Heartbeat, request_id, b"")

    def close(self) -> None:
        self.state = "closed"

    # -- input ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns what they mean, in order."""
        if self.state == "closed":
            return []
        events: list[Event] = []
        try:
            for frame in self._decoder.feed(data):
                events.extend(self._frame(frame.msg_type, frame.request_id, frame.payload))
                if self.state == "closed":
                    break
        except ProtocolError as exc:
            events.append(self._violate(exc.code, exc.message))
        return events

    def receive_eof(self) -> str | None:
        """The daemon closed its side; returns a complaint if it stopped mid-frame."""
        self.state = "closed"
        if not self._decoder.at_frame_boundary():
            return f"connection closed in the middle of a frame ({self._decoder.buffered} bytes pending)"
        return None

    def _violate(self, code: str, message: str) -> Violation:
        self._queue(MsgType.Error, 0, _dumps({"code": code, "message": message}))
        self.state = "closed"
        return Violation(code, message)

    def _frame(self, msg_type: int, request_id: int, payload: bytes) -> list[Event]:
        if msg_type == MsgType.Error:
            code, message = _error_fields(payload)
            first = self.state == "handshake"
            self.state = "closed"
            return [Rejected(code, message) if first else RemoteError(code, message)]
        if self.state == "handshake":
            if msg_type != MsgType.Handshake:
                return [
                    self._violate(
                        "handshake_required", f"expected a Handshake frame, got type 0x{msg_type:02X}"
                    )
                ]
            self.state = "open"
            self.handshake_reply = payload
            return [Ready(payload)]
        if msg_type == MsgType.Heartbeat:
            if not payload:
                self._queue(MsgType.Heartbeat, request_id, PONG)
                return []
            if payload == PONG:
                return [Pong(request_id)]
            return [Ignored(f"heartbeat with unexpected payload {payload[:32]!r}")]
        if msg_type == MsgType.RpcRequest:
            return self._request(request_id, payload)
        if msg_type == MsgType.RpcResponse:
            try:
                result = json.loads(payload.decode("utf-8")) if payload else None
            except (UnicodeDecodeError, ValueError) as exc:
                return [ErrorReply(request_id, "bad_response", f"reply is not JSON: {exc}")]
            return [Response(request_id, result)]
        if msg_type == MsgType.RpcError:
            code, message = _error_fields(payload)
            return [ErrorReply(request_id, canonical_code(code), message)]
        if msg_type in (MsgType.StreamData, MsgType.TtyResize):
            return [StreamIn(msg_type, request_id, payload)]
        if msg_type == MsgType.Handshake:
            return [Ignored("second Handshake frame")]
        return [Ignored(f"unexpected {MsgType(msg_type).name} frame from the host")]

    def _request(self, request_id: int, payload: bytes) -> list[Event]:
        try:
            obj = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            return self._bad_request(request_id, f"request is not JSON: {exc}")
        if not isinstance(obj, dict):
            return self._bad_request(request_id, "request is not a JSON object")
        method = obj.get("method")
        if isinstance(method, str):
            params = obj.get("params")
        elif isinstance(obj.get("event"), str):
            method = obj["event"]
            params = {k: v for k, v in obj.items() if k != "event"}
        else:
            return self._bad_request(request_id, 'request has no "method" (or "event") string')
        if request_id == 0:
            if method == "vhub.hello":
                return [Hello(params)]
            if method == "vhub.ack":
                frames = params.get("frames") if isinstance(params, dict) else None
                if isinstance(frames, int) and not isinstance(frames, bool) and frames >= 0:
                    return [Ack(frames)]
                return [Ignored(f"vhub.ack without a valid frames count: {params!r}")]
        return [Request(request_id, method, params)]

    def _bad_request(self, request_id: int, message: str) -> list[Event]:
        if request_id == 0:
            return [Ignored(f"bad notification: {message}")]
        self.send_error(request_id, "bad_request", message)
        return [Ignored(f"bad request {request_id}: {message}")]
