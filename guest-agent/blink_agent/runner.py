"""Commands run on behalf of the host: the ``agent.*`` methods of ``blink-agent serve``.

This module owns the executions of an agent: checking ``agent.*`` parameters,
starting commands (on pipes here, on a terminal through :mod:`blink_agent.pty`),
timeouts and kills, and reporting each result. An execution is one child process
(:class:`~blink_agent.execution.Execution`). Its stdout and stderr are relayed live as
Stdout / Stderr frames tagged with the execution id, read in chunks of up to 64 KiB
as they come; the relay waits whenever the hub's buffer is full, so a fast writer is
slowed to the connection's pace and nothing is dropped while connected. Once the
process has exited and both pipes are drained, the agent reports
``{"event": "execution_result", ...}`` as a request, after all of the output.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import platform
import shlex
import signal as _signal
import socket
import time
from typing import Any

from . import pty
from ._version import __version__
from .async_hub import AsyncHub
from .errors import ConnectionLost, RpcError
from .execution import Execution, next_execution_id
from .stdin import WINDOW, StdinFeed
from .wire import MsgType

__all__ = ["Execution", "ExecutionManager", "next_execution_id"]

log = logging.getLogger("blink_agent")

READ_CHUNK = 64 * 1024
_STARTED = time.monotonic()


def _bad_params(message: str) -> RpcError:
    return RpcError("bad_params", message)


def _parse_signal(value: Any) -> int:
    if value is None:
        return int(_signal.SIGTERM)
    if isinstance(value, bool):
        raise _bad_params("signal must be an int or a name like 'SIGTERM'")
    if isinstance(value, int):
        if value <= 0:
            raise _bad_params(f"signal must be positive, not {value}")
        return value
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(_signal, name, None)
        if isinstance(sig, int):
            return int(sig)
        raise _bad_params(f"unknown signal {value!r}")
    raise _bad_params("signal must be an int or a name like 'SIGTERM'")


class ExecutionManager:
    """Spawns and tracks executions, and reports their results through ``hub``.

    ``new_session``: start each command in its own session / process group, so that
    ``agent.kill`` reaches the whole tree (for ``serve``; ``run`` keeps the terminal's).
    """

    def __init__(self, hub: AsyncHub, *, new_session: bool = True, result_timeout: float = 30.0) -> None:
        self.hub = hub
        self.new_session = new_session
        self.result_timeout = result_timeout
        self.executions: dict[int, Execution] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def register(self) -> None:
        """Serve ``agent.run``, ``agent.kill``, ``agent.ping`` and ``agent.info``."""
        self.hub.serve("agent.run", self.rpc_run)
        self.hub.serve("agent.kill", self.rpc_kill)
        self.hub.serve("agent.ping", self.rpc_ping)
        self.hub.serve("agent.info", self.rpc_info)
        if self.hub.on_stream is None:
            self.hub.on_stream = self.on_stream

    def on_stream(self, msg_type: int, request_id: int, payload: bytes) -> None:
        """Host StreamData: stdin of a pipe execution started with ``stdin_stream``
        (:mod:`blink_agent.stdin`), or keyboard input / TtyResize for a terminal."""
        execution = self.executions.get(request_id)
        feed = getattr(execution, "stdin_feed", None)
        if feed is not None:
            if msg_type == MsgType.StreamData:
                feed.put(payload)
            return
        pty.deliver(execution, msg_type, request_id, payload)

    # -- RPC methods ---------------------------------------------------------------

    async def rpc_run(self, params: Any) -> dict[str, Any]:
        if not isinstance(params, dict):
            raise _bad_params("agent.run params must be an object with an argv list")
        argv = params.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise _bad_params("argv must be a non-empty list of strings")
        env_over = params.get("env")
        if env_over is not None and (
            not isinstance(env_over, dict)
            or not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in env_over.items())
        ):
            raise _bad_params("env must be an object of strings (null unsets a variable)")
        cwd = params.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise _bad_params("cwd must be a string")
        stdin_data: bytes | None = None
        if params.get("stdin") is not None:
            if not isinstance(params["stdin"], str):
                raise _bad_params("stdin must be a string (utf-8 text); use stdin_b64 for bytes")
            stdin_data = params["stdin"].encode("utf-8")
        elif params.get("stdin_b64") is not None:
            try:
                stdin_data = base64.b64decode(params["stdin_b64"], validate=True)
            except (TypeError, ValueError) as exc:
                raise _bad_params(f"stdin_b64 is not valid base64: {exc}") from None
        stdin_stream = params.get("stdin_stream", False)
        if not isinstance(stdin_stream, bool):
            raise _bad_params("stdin_stream must be true or false")
        if stdin_stream and stdin_data is not None:
            raise _bad_params("stdin_stream does not combine with stdin / stdin_b64")
        timeout = params.get("timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise _bad_params("timeout must be a positive number of seconds")
        if params.get("tty"):
            if stdin_data is not None or stdin_stream:
                raise _bad_params("stdin does not combine with tty: send keyboard input as StreamData")
            return await self.start_tty(argv, params, env=env_over, cwd=cwd, timeout=timeout)
        execution = await self.start(argv, env=env_over, cwd=cwd, stdin=stdin_data, timeout=timeout,
                                     stdin_stream=stdin_stream)
        if stdin_stream:
            return {"execution_id": execution.id, "pid": execution.pid, "stdin_window": WINDOW}
        return {"execution_id": execution.id, "pid": execution.pid}

    async def start_tty(
        self,
        argv: list[str],
        params: dict[str, Any],
        *,
        env: dict[str, str | None] | None,
        cwd: str | None,
        timeout: float | None,
    ) -> dict[str, Any]:
        """``agent.run`` with ``"tty": true``: the command on a terminal of its own
        (:mod:`blink_agent.pty`); raises ``RpcError("bad_params" / "spawn_failed")``."""
        rows, cols, term = pty.parse_params(params)
        proc, terminal = await pty.spawn_on_terminal(
            argv, env=self._env(env), cwd=cwd, rows=rows, cols=cols, term=term
        )
        eid = next_execution_id()
        execution = pty.TtyExecution(eid, list(argv), proc, terminal)
        self.executions[eid] = execution
        shown = " ".join(shlex.quote(a) for a in argv)
        log.info(
            "execution %d: started pid %d on a %dx%d terminal: %s",
            eid,
            proc.pid,
            cols,
            rows,
            shown.replace("\n", "\\n")[:300],
        )
        self._spawn(self._supervise_tty(execution, timeout))
        return {"execution_id": execution.id, "pid": execution.pid, "tty": True}

    def _env(self, env: dict[str, str | None] | None) -> dict[str, str]:
        """The command's environment: ours, what the daemon said its programs
        attach with (session, attach token), and the caller's changes."""
        full_env = dict(os.environ, VHUB_ATTACH="1", **getattr(self.hub, "attach_env", {}))
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return full_env

    def rpc_kill(self, params: Any) -> dict[str, Any]:
        if (
            not isinstance(params, dict)
            or isinstance(params.get("execution_id"), bool)
            or not isinstance(params.get("execution_id"), int)
        ):
            raise _bad_params('agent.kill needs {"execution_id": int}')
        execution = self.executions.get(params["execution_id"])
        if execution is None:
            raise RpcError("no_such_execution", f"no running execution {params['execution_id']}")
        sig = _parse_signal(params.get("signal"))
        log.info("execution %d: sending signal %d", execution.id, sig)
        execution.send_signal(sig)
        return {"ok": True}

    def rpc_ping(self, params: Any) -> dict[str, Any]:
        return {"pong": True}

    def rpc_info(self, params: Any) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "python": platform.python_version(),
            "uptime": round(time.monotonic() - _STARTED, 3),
            "version": __version__,
            "hostname": socket.gethostname(),
            "executions": sorted(self.executions),
        }

    # -- executions -------------------------------------------------------------------

    async def start(
        self,
        argv: list[str],
        *,
        env: dict[str, str | None] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        inherit_stdin: bool = False,
        timeout: float | None = None,
        execution_id: int | None = None,
        stdin_stream: bool = False,
    ) -> Execution:
        """Spawn ``argv`` and start relaying; raises ``RpcError("spawn_failed")``."""
        full_env = self._env(env)
        if stdin is not None or stdin_stream:
            stdin_mode: Any = asyncio.subprocess.PIPE
        elif inherit_stdin:
            stdin_mode = None
        else:
            stdin_mode = asyncio.subprocess.DEVNULL
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdin_mode,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=full_env,
                cwd=cwd,
                start_new_session=self.new_session,
            )
        except (OSError, ValueError) as exc:
            raise RpcError("spawn_failed", str(exc)) from None
        eid = execution_id if execution_id is not None else next_execution_id()
        execution = Execution(eid, list(argv), proc, self.new_session)
        if stdin_stream:
            assert proc.stdin is not None
            execution.stdin_feed = StdinFeed(eid, proc.stdin, self.hub.notify)
        self.executions[eid] = execution
        shown = " ".join(shlex.quote(a) for a in argv)
        log.info("execution %d: started pid %d: %s", eid, proc.pid, shown.replace("\n", "\\n")[:300])
        self._spawn(self._supervise(execution, stdin, timeout))
        return execution

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _feed_stdin(self, execution: Execution, data: bytes) -> None:
        pipe = execution.proc.stdin
        assert pipe is not None
        try:
            pipe.write(data)
            await pipe.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.info("execution %d: stdin closed early by the command", execution.id)
        finally:
            try:
                pipe.close()
            except (BrokenPipeError, ConnectionResetError):
                pass

    async def _relay(self, execution: Execution, pipe: asyncio.StreamReader | None, msg_type: int) -> None:
        if pipe is None:
            return
        hub = self.hub
        while True:
            chunk = await pipe.read(READ_CHUNK)
            if not chunk:
                return
            if msg_type == MsgType.Stdout:
                execution.stdout_bytes += len(chunk)
            else:
                execution.stderr_bytes += len(chunk)
            await hub.send_stream(msg_type, execution.id, chunk)

    async def _supervise(self, execution: Execution, stdin: bytes | None, timeout: float | None) -> None:
        proc = execution.proc
        loop = asyncio.get_running_loop()
        timer = None
        if timeout is not None:
            timer = loop.call_later(timeout, self._time_out, execution, timeout)
        if execution.stdin_feed is not None:
            feeder: asyncio.Task[Any] | None = self._spawn(execution.stdin_feed.run())
        elif stdin is not None:
            feeder = self._spawn(self._feed_stdin(execution, stdin))
        else:
            feeder = None
        try:
            await asyncio.gather(
                self._relay(execution, proc.stdout, MsgType.Stdout),
                self._relay(execution, proc.stderr, MsgType.Stderr),
            )
            code = await proc.wait()
        except asyncio.CancelledError:
            execution.send_signal(_signal.SIGKILL)
            await proc.wait()
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if feeder is not None and not feeder.done():
                feeder.cancel()
        await self.finish(execution, code)

    async def _supervise_tty(self, execution: pty.TtyExecution, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(timeout, self._time_out, execution, timeout) if timeout is not None else None
        try:
            code = await pty.run_terminal(execution, self.hub.send_stream, self._spawn)
        finally:
            if timer is not None:
                timer.cancel()
        await self.finish(execution, code, tty=True)

    async def finish(self, execution: Execution, code: int, **extra: Any) -> None:
        """The process exited with ``code`` and its output is relayed: report the result."""
        sig = -code if code < 0 else None
        result = {
            "event": "execution_result",
            "execution_id": execution.id,
            "exit_code": code,
            "signal": sig,
            "stdout_bytes": execution.stdout_bytes,
            "stderr_bytes": execution.stderr_bytes,
            **extra,
        }
        execution.result = result
        if not execution.exited.done():
            execution.exited.set_result(result)
        log.info(
            "execution %d: exited %s (%d stdout bytes, %d stderr bytes)",
            execution.id,
            f"by signal {sig}" if sig else f"with code {code}",
            execution.stdout_bytes,
            execution.stderr_bytes,
        )
        self.executions.pop(execution.id, None)
        try:
            await self.report(result)
        finally:
            if not execution.done.done():
                execution.done.set_result(result)

    async def report(self, result: dict[str, Any]) -> bool:
        """Deliver an execution_result after all of the output; True once answered."""
        hub = self.hub
        try:
            await hub.deliver_event(result, hub.outbox.last_seq, timeout=self.result_timeout)
            return True
        except RpcError as exc:
            log.warning("execution %d: result refused by the host: %s", result["execution_id"], exc)
        except ConnectionLost as exc:
            log.warning("execution %d: result not delivered: %s", result["execution_id"], exc)
        except TimeoutError as exc:
            log.warning("execution %d: result not acknowledged: %s", result["execution_id"], exc)
        return False

    def _time_out(self, execution: Execution, timeout: float) -> None:
        if execution.proc.returncode is None:
            log.warning("execution %d: timeout of %g s reached, killing it", execution.id, timeout)
            execution.timed_out = True
            execution.send_signal(_signal.SIGKILL)

    async def shutdown(self, grace: float = 2.0) -> None:
        """Stop every running execution: SIGTERM, then SIGKILL after ``grace``; give
        their results ``grace`` seconds more to be reported."""
        for execution in list(self.executions.values()):
            execution.send_signal(_signal.SIGTERM)
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        if pending:
            for execution in list(self.executions.values()):
                execution.send_signal(_signal.SIGKILL)
            _, pending = await asyncio.wait(pending, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
