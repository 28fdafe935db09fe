"""Every exception the guest agent raises, named by who is responsible.

- :class:`ProtocolError`: the peer sent bytes that break BLIN v1 (``.code`` is the
  wire error code, e.g. ``bad_magic``); also a ``ValueError``.
- :class:`AddressError`: a ``VHUB_ADDR`` that cannot be parsed or used; a ``ValueError``.
- :class:`HandshakeRejected`: the daemon answered the handshake with an ``Error`` frame.
- :class:`ConnectionLost`: the connection ended (or never came up) while something
  waited on it; a ``ConnectionError``.
- :class:`CallTimeout`: a guest->host call got no reply in time; a ``TimeoutError``.
- :class:`RpcError`: the host answered a call with ``RpcError``; raise it from a
  handler to answer with a chosen code.

Every exception class of the package derives from :class:`AgentError`. Wire error codes
have one spelling per meaning, the host's (``vhubd.errors.CODE_ALIASES``, copied here
because the agent shares the spec, not the host's imports): :data:`CODE_ALIASES` maps
the old spellings to it and :func:`canonical_code` applies the map.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ProtocolError",
    "AddressError",
    "HandshakeRejected",
    "ConnectionLost",
    "CallTimeout",
    "RpcError",
    "CODE_ALIASES",
    "canonical_code",
]

#: Old spelling -> the one wire code for that meaning (the host's table, same content).
CODE_ALIASES = {
    "handler_error": "handler_failed",  # a handler raised (older host clients)
    "no_such_method": "no_handler",  # nobody serves the method (older agents and daemons)
}


def canonical_code(code: str) -> str:
    """The one spelling of a wire error code (old spellings map to it)."""
    return CODE_ALIASES.get(code, code)


class AgentError(Exception):
    """Root of every error raised by blink_agent."""


class ProtocolError(AgentError, ValueError):
    """The remote peer broke the BLIN v1 protocol.

    ``code`` is the code sent in the ``Error`` frame (``bad_magic``, ``bad_version``,
    ``unknown_type``, ``frame_too_large``, ``handshake_required``, ``bad_json``...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AddressError(AgentError, ValueError):
    """A VHUB_ADDR value is malformed or unusable on this platform."""


class HandshakeRejected(AgentError, ConnectionError):
    """The daemon refused the handshake (``bad_token``, ``unknown_session``, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"handshake rejected: {code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(AgentError, ConnectionError):
    """The connection to the daemon is gone (or was never made)."""


class CallTimeout(AgentError, TimeoutError):
    """A call to the host got no reply within its timeout."""


class ChannelReset(AgentError, ConnectionError):
    """A channel (an exposed port's connection, a copy) was reset: by the host,
    or because the connection it lived on went."""


class UnsafeArchive(AgentError, ValueError):
    """A tar member that must not be extracted; the message names it."""


class RpcError(AgentError):
    """An RPC answered with an error: ``code`` (str) and ``message`` (str)."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message

    def to_json(self) -> dict:
        """The wire shape ``{"code": str, "message": str}``."""
        return {"code": self.code, "message": self.message}
