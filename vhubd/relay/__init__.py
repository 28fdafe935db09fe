"""Routing between guests and host clients (DESIGN §3, §4, §6), as plain logic.

One job per module: ``admission`` (handshakes, roles, tokens), ``streams``
(fan-out, cut-through, scrollback, acks, backpressure), ``rpc`` (ids,
in-flight, expiry), ``terminals`` (the writer seat), ``calls`` (``vhub.*``),
with ``core.Relay`` the thin dispatcher in front. ``port`` is the one typed
boundary to the I/O layer: the relay reaches connections only through it.
"""

from .core import Booter, Config, Relay
from .members import Member
from .port import Accept, Decision, Defer, Limits, Listener, Port, Refuse

__all__ = ["Accept", "Booter", "Config", "Decision", "Defer", "Limits", "Listener", "Member", "Port", "Refuse",
           "Relay"]
