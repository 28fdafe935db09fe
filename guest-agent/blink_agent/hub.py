"""The public face of the agent's connection: :func:`connect` and :func:`aconnect`.

This module owns the two ways in and nothing else; it sits on top of the modules
that do the work, each with one job, and re-exports their public names so that
``from blink_agent.hub import ...`` keeps working:

- :mod:`blink_agent.link`: one live connection (streams, protocol state, writes,
  heartbeat, ack probe);
- :mod:`blink_agent.output`: the output flow through the bounded buffer;
- :mod:`blink_agent.rpc`: pending calls and served methods;
- :mod:`blink_agent.async_hub`: :class:`AsyncHub`, reconnecting and dispatching;
- :mod:`blink_agent.blocking`: :class:`Hub`, an AsyncHub on its own loop and thread.
"""

from __future__ import annotations

from typing import Any

from .address import Address
from .async_hub import STREAM_CHUNK, AsyncHub, backoff_delays
from .blocking import Hub

__all__ = ["AsyncHub", "Hub", "connect", "aconnect", "backoff_delays", "STREAM_CHUNK"]


def connect(
    addr: str | Address | None = None,
    session: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> Hub:
    """Connect to the daemon and return a blocking :class:`Hub` once the handshake
    succeeded. Raises :class:`~blink_agent.errors.AddressError`,
    :class:`ConnectionLost` or :class:`HandshakeRejected`. Options are those of
    :class:`AsyncHub` (``buffer_bytes``, ``heartbeat_interval``, ``reconnect``...)."""
    return Hub(addr, session, token, timeout=timeout, **options)


async def aconnect(
    addr: str | Address | None = None,
    session: str | None = None,
    token: str | None = None,
    timeout: float = 10.0,
    **options: Any,
) -> AsyncHub:
    """Asyncio flavour of :func:`connect`: returns a started :class:`AsyncHub`."""
    options.setdefault("connect_timeout", timeout)
    options.setdefault("handshake_timeout", timeout)
    hub = AsyncHub(addr, session, token, **options)
    await hub.start(wait=True)
    return hub
