"""The exception tree: one root, errors named by who is responsible.

``ProtocolError`` and its children mean the peer misbehaved and carry the wire
error code sent in the ``Error`` frame; ``InvalidState`` means local misuse.
"""

from __future__ import annotations

from . import frames


class VhubError(Exception):
    """Root of every error raised by vhubd."""


class ProtocolError(VhubError, ValueError):
    """The peer broke the protocol; ``code`` goes into the Error frame."""

    code = "protocol_error"

    def __init__(self, message: str = "", offset: int | None = None):
        super().__init__(message or self.code)
        self.message = message or self.code
        self.offset = offset


class BadMagic(ProtocolError):
    code = "bad_magic"


class BadVersion(ProtocolError):
    code = "bad_version"


class UnknownType(ProtocolError):
    code = "unknown_type"


class FrameTooLarge(ProtocolError):
    code = "frame_too_large"


class HandshakeRequired(ProtocolError):
    code = "handshake_required"


class BadPayload(ProtocolError):
    code = "bad_payload"


class InvalidState(VhubError, RuntimeError):
    """The local side misused an object (e.g. sent before the handshake)."""


class ConnectionClosed(VhubError, ConnectionError):
    """The connection is gone; ``code``/``message`` say why when known."""

    def __init__(self, message: str = "connection closed", code: str = "closed"):
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(VhubError):
    """The peer answered with an Error or RpcError frame."""

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class BootFailed(VhubError):
    code = "boot_failed"


STATUS_ERRORS: dict[int, type[ProtocolError]] = {
    frames.BAD_MAGIC: BadMagic,
    frames.BAD_VERSION: BadVersion,
    frames.UNKNOWN_TYPE: UnknownType,
    frames.FRAME_TOO_LARGE: FrameTooLarge,
}


def error_for_status(status: int, offset: int | None = None) -> ProtocolError:
    """The exception for a codec status code (both backends use this)."""
    cls = STATUS_ERRORS.get(status, ProtocolError)
    return cls(f"{cls.code} at offset {offset}" if offset is not None else cls.code, offset)
