"""RPC bookkeeping for the hub: the calls we wait on and the methods we serve.

:class:`PendingCalls` allocates request ids (shared with heartbeat pings, so that an id
is never reused while a call waits on it) and holds one future per guest->host call,
tagged with the link it went out on so that a dying link fails exactly its own calls.
:class:`Handlers` is the table of host->guest methods and answers a request on the
link it came from: the handler's result, the code of an :class:`RpcError` it raised,
``handler_failed`` for any other exception, ``no_handler`` when nobody serves the
method. Notifications (request_id 0) are never answered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, Callable

from . import protocol as P
from .errors import ConnectionLost, RpcError
from .link import Link

__all__ = ["Handler", "Handlers", "PendingCalls"]

log = logging.getLogger("blink_agent")

_U64 = (1 << 64) - 1

#: A served method: ``fn(params)`` returning a JSON value or an awaitable of one.
Handler = Callable[[Any], Any]


class PendingCalls:
    """Guest->host calls waiting for their reply, by request id."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[asyncio.Future[Any], Link, str]] = {}
        self._next_id = 1

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._pending

    def alloc_id(self) -> int:
        """A request id in 1..2**64-1 that no waiting call uses."""
        while True:
            rid = self._next_id
            self._next_id = 1 if rid >= _U64 else rid + 1
            if rid not in self._pending:
                return rid

    def add(self, request_id: int, link: Link, label: str) -> asyncio.Future[Any]:
        """Wait for the reply to ``request_id`` sent on ``link`` (``label`` names it in errors)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (fut, link, label)
        return fut

    def discard(self, request_id: int) -> None:
        self._pending.pop(request_id, None)

    def resolve(self, request_id: int, result: Any = None, error: BaseException | None = None) -> None:
        """The reply came: complete the call's future (replies to no call are logged)."""
        entry = self._pending.get(request_id)
        if entry is None:
            log.debug("reply for unknown request id %d ignored", request_id)
            return
        fut = entry[0]
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def fail(self, link: Link | None, address: object, reason: str) -> None:
        """Fail with :class:`ConnectionLost` every call sent on ``link`` (None: all)."""
        for rid, (fut, owner, label) in list(self._pending.items()):
            if link is None or owner is link:
                del self._pending[rid]
                if not fut.done():
                    fut.set_exception(
                        ConnectionLost(
                            f"connection to {address} lost before the reply to {label!r}"
                            f" (request id {rid}): {reason}"
                        )
                    )


class Handlers:
    """Host->guest methods and the answers to their requests."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def serve(self, method: str, fn: Handler) -> None:
        self._handlers[method] = fn

    async def handle(self, link: Link, req: P.Request) -> None:
        """Run the handler of ``req`` and answer on ``link`` (unless a notification)."""
        fn = self._handlers.get(req.method)
        if fn is None:
            if req.request_id:
                _reply_error(link, req.request_id, "no_handler", f"no handler for {req.method!r}")
            else:
                log.debug("notification %r ignored: no handler", req.method)
            return
        try:
            result = fn(req.params)
            if inspect.isawaitable(result):
                result = await result
        except RpcError as exc:
            if req.request_id:
                _reply_error(link, req.request_id, exc.code, exc.message)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("handler for %r failed: %s: %s", req.method, type(exc).__name__, exc)
            log.debug("handler for %r failed", req.method, exc_info=True)
            if req.request_id:
                _reply_error(link, req.request_id, "handler_failed", f"{type(exc).__name__}: {exc}")
            return
        if req.request_id:
            if link.proto.state != "open":
                log.info("reply to %r dropped: its connection is gone", req.method)
                return
            try:
                link.proto.send_response(req.request_id, result)
            except (TypeError, ValueError) as exc:
                _reply_error(link, req.request_id, "bad_result", f"result is not JSON: {exc}")
                return
            link.flush()


def _reply_error(link: Link, request_id: int, code: str, message: str) -> None:
    if link.proto.state == "open":
        link.proto.send_error(request_id, code, message)
        link.flush()
