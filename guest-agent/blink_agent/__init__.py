"""blink_agent: the V-Hub guest agent and its library (standard library only).

Inside a sandbox, an agent reaches the host daemon with::

    import blink_agent
    with blink_agent.connect() as hub:          # VHUB_ADDR, VHUB_SESSION, VHUB_TOKEN
        hub.stdout(b"hello\\n")
        result = hub.call("method", {"x": 1})
        hub.serve("guest.method", lambda params: {"ok": True})

``await blink_agent.aconnect()`` gives the asyncio flavour with the same methods.
"""

from ._version import __version__
from .address import DEFAULT_ADDR, Address, parse_address
from .errors import (
    AddressError,
    AgentError,
    CallTimeout,
    ConnectionLost,
    HandshakeRejected,
    ProtocolError,
    RpcError,
)
from .hub import AsyncHub, Hub, aconnect, connect

__all__ = [
    "__version__",
    "connect",
    "aconnect",
    "Hub",
    "AsyncHub",
    "Address",
    "parse_address",
    "DEFAULT_ADDR",
    "AgentError",
    "AddressError",
    "ProtocolError",
    "HandshakeRejected",
    "ConnectionLost",
    "CallTimeout",
    "RpcError",
]
