"""The exception tree: one root, errors named by who is responsible.

Every exception the package raises sits under ``VhubError``:

- ``ProtocolError`` and its children: the peer broke BLIN; ``code`` is the
  wire code sent in the ``Error`` frame.
- ``InvalidState``: local misuse of an object.
- ``ConnectionClosed`` / ``RemoteError``: what a client sees of the other end.
- ``CallFailed``: a daemon call or routed RPC answered with an RpcError
  (``code``, ``message``): raised inside the daemon, turned into the frame.
- ``BootFailed``, ``BackendError``: starting a sandbox failed (the backend's words).
- ``ConfigError``, ``ListenError``, ``ActivationError``, ``BackendStartError``,
  ``OnceError``: the daemon cannot start or run as configured; one clear line.
- ``GuestImageError``: the qemu guest image cannot be built or found.
- ``GuestFault`` (``VirtqError``, ``GuestMemoryError``, ``PacketError``) and
  ``VhostUserError``: a VM's vsock device was driven out of spec.

Wire error codes have one spelling per meaning (``CODE_ALIASES`` maps the old
spellings that deployed agents and clients may still send).
"""

from __future__ import annotations

from . import frames


class VhubError(Exception):
    """Root of every error raised by vhubd."""


# --- the peer broke the protocol ------------------------------------------------------

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


class InvalidName(ProtocolError):
    """A session name that does not match ``[a-z0-9][a-z0-9_.-]{0,62}``."""

    code = "bad_session_name"


# --- local misuse, and what a client sees --------------------------------------------

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
        code = canonical_code(code)
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class CallFailed(VhubError):
    """A call handled by the daemon fails with this RpcError ``code``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# --- sandboxes ------------------------------------------------------------------------

class BootFailed(VhubError):
    code = "boot_failed"


class BackendError(VhubError):
    """A backend failed; the message is the backend's own words."""


class GuestImageError(VhubError):
    """The guest image cannot be built or found; the message says what to do."""


# --- the daemon cannot start or run as configured -------------------------------------

class UnsafeArchive(VhubError, ValueError):
    """``blink cp``: a tar member that must not be extracted; the message names it."""


class ConfigError(VhubError, ValueError):
    """A setting is invalid; the message names it."""


class ListenError(VhubError):
    """A listener could not be set up; the message is one clear line."""


class ActivationError(VhubError):
    """The service manager passed sockets the daemon cannot use; one clear line."""


class BackendStartError(VhubError):
    """The chosen backend cannot be initialised."""


class HttpError(VhubError):
    """An HTTP API request fails: Blink's ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class OnceError(VhubError):
    """``serve --once`` ended without the exchange it exists for."""


# --- a VM's vsock device driven out of spec -------------------------------------------

class GuestFault(VhubError, ValueError):
    """Guest-controlled memory or packets are malformed (the guest's fault)."""


class GuestMemoryError(GuestFault):
    """An address outside every region (the guest's or the VMM's fault)."""


class VirtqError(GuestFault):
    """A malformed ring or descriptor chain (the guest's fault)."""


class PacketError(GuestFault):
    """A vsock packet that cannot be parsed (the guest's fault)."""


class VhostUserError(VhubError):
    """The front-end sent something we cannot work with; the connection
    should be dropped (as QEMU's own back-ends do)."""


# --- codec status codes and wire code spellings ---------------------------------------

STATUS_ERRORS: dict[int, type[ProtocolError]] = {
    frames.BAD_MAGIC: BadMagic,
    frames.BAD_VERSION: BadVersion,
    frames.UNKNOWN_TYPE: UnknownType,
    frames.FRAME_TOO_LARGE: FrameTooLarge,
}

# old spelling -> the one code for that meaning (docs/protocol.md, "Error codes")
CODE_ALIASES = {
    "handler_error": "handler_failed",  # a host handler raised (vhubd.client before 0.2)
    "no_such_method": "no_handler",  # nobody serves the method (the agent and vhub.* before 0.2)
}


CLIP = 200  # characters of a peer-supplied value that reach a log line or an Error message


def clip(value: object, limit: int = CLIP) -> str:
    """``repr`` of a value a peer chose, at most about ``limit`` characters:
    what a hostile peer sends never grows a log line or an echo without bound
    (and a huge container is never rendered at all)."""
    if isinstance(value, (str, bytes, bytearray, memoryview)):
        cut = len(value) > limit
        text = repr(value[:limit] if not isinstance(value, memoryview) else bytes(value[:limit]))
        return text[:limit + 8] + (f"... ({len(value)} long)" if cut else "")
    if isinstance(value, list) and len(value) <= 8 and all(isinstance(v, str) and len(v) <= 64 for v in value):
        return repr(value)  # a short list of short strings (served methods, subscriptions): as it is
    if value is None or isinstance(value, (bool, int, float)):
        try:
            return repr(value)[:limit]
        except ValueError:  # an int past Python's digit limit
            return "<int>"
    try:
        return f"<{type(value).__name__} of {len(value)}>"  # type: ignore[arg-type]
    except TypeError:
        return f"<{type(value).__name__}>"


def canonical_code(code: str) -> str:
    """The one spelling of a wire error code (old spellings still accepted)."""
    return CODE_ALIASES.get(code, code)


def error_for_status(status: int, offset: int | None = None) -> ProtocolError:
    """The exception for a codec status code (both backends use this)."""
    cls = STATUS_ERRORS.get(status, ProtocolError)
    return cls(f"{cls.code} at offset {offset}" if offset is not None else cls.code, offset)
