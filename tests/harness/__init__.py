"""The one test harness: tests, benchmarks and the reliability script use it.

- ``daemon``: ``Daemon``, a real ``blink serve`` process, ready on ``READY=1``
  from a test ``NOTIFY_SOCKET``; ``control_call`` and friends (blocking).
- ``peers``: raw guests and clients on real sockets (async and blocking), the
  async ``Client`` helper, ``run`` for async test bodies.
- ``wire``: frame builders and parsers.
- ``inproc``: the relay in-process against fake ports (no socket at all).
"""

from .daemon import ROOT, Daemon, client_handshake, control_call, read_frame, recv_exact, wait_for
from .peers import AsyncPeer, RawClient, RawGuest, client, json_of, run, session_info, wait_until
from .wire import READY, T, error_of, frame, header

__all__ = ["READY", "ROOT", "AsyncPeer", "Daemon", "RawClient", "RawGuest", "T", "client", "client_handshake",
           "control_call", "error_of", "frame", "header", "json_of", "read_frame", "recv_exact", "run",
           "session_info", "wait_for", "wait_until"]
