"""The blocking flavour of the hub: an :class:`~blink_agent.async_hub.AsyncHub` running
on its own event loop in a background thread.

:class:`Hub` owns that loop, its thread and the worker threads that run served
handlers (so a handler may itself call ``hub.call``); every method submits a
coroutine to the loop and waits for it. What a connection does is the AsyncHub's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any

from .address import Address, parse_address
from .async_hub import AsyncHub
from .errors import ConnectionLost
from .outbox import Outbox
from .rpc import Handler

__all__ = ["Hub"]


class Hub:
    """Blocking flavour of :class:`AsyncHub`: runs its own event loop in a daemon
    thread. Use :func:`~blink_agent.hub.connect` to make one; usable as a context manager."""

    def __init__(
        self,
        addr: str | Address | None = None,
        session: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        **options: Any,
    ) -> None:
        # Parse first so that a bad address raises here, before any thread starts.
        if addr is None:
            addr = os.environ.get("VHUB_ADDR")
        address = addr if isinstance(addr, Address) else parse_address(addr)
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=8, thread_name_prefix="blink-agent-worker"
        )
        self._loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self._loop.run_forever, name="blink-agent-loop", daemon=True)
        self._thread.start()
        options.setdefault("connect_timeout", timeout)
        options.setdefault("handshake_timeout", timeout)

        async def make() -> AsyncHub:
            return AsyncHub(address, session, token, **options)

        try:
            self._hub = self._submit(make())
            self._submit(self._hub.start(wait=True))
        except BaseException:
            self._shutdown_loop()
            raise

    def _submit(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def address(self) -> Address:
        return self._hub.address

    @property
    def connected(self) -> bool:
        return self._hub.connected

    @property
    def outbox(self) -> Outbox:
        return self._hub.outbox

    def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        """Blocking :meth:`AsyncHub.call`."""
        self._check_open()
        return self._submit(self._hub.call(method, params, timeout))

    def notify(self, method: str, params: Any = None) -> None:
        self._check_open()
        self._submit(self._hub.notify(method, params))

    def stdout(self, data: bytes | bytearray | memoryview | str, execution_id: int = 0) -> None:
        """Queue Stdout output; blocks while connected and the buffer is full."""
        self._check_open()
        self._submit(self._hub.stdout(data, execution_id))

    def stderr(self, data: bytes | bytearray | memoryview | str, execution_id: int = 0) -> None:
        self._check_open()
        self._submit(self._hub.stderr(data, execution_id))

    def flush(self, timeout: float | None = None) -> bool:
        self._check_open()
        return bool(self._submit(self._hub.flush(timeout)))

    def serve(self, method: str, fn: Handler) -> None:
        """Answer host calls of ``method`` with ``fn(params)``, run in a worker thread
        (so ``fn`` may itself call ``hub.call``)."""
        loop = self._loop

        def run_in_worker(params: Any) -> asyncio.Future[Any]:
            return loop.run_in_executor(None, fn, params)

        self._hub.serve(method, run_in_worker)

    def close(self, flush_timeout: float = 5.0) -> None:
        """Flush (bounded), disconnect and stop the background thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._hub.close(flush_timeout), self._loop).result()
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._closed = True
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        in_worker = threading.current_thread().name.startswith("blink-agent-worker")
        self._executor.shutdown(wait=not in_worker)
        self._loop.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost("hub closed")

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
