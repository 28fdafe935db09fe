"""The HTTP API (``blink serve --http``): Blink's ``blink-server`` REST surface
and WebSocket attach, on the daemon's own loop with aiohttp, and the web page.

Guards, in this order, on every request: the connection bound, the origin
(cross-origin refused unless ``--http-origin`` names it), then for ``/api/`` the
bearer token (``Authorization: Bearer``, or ``?token=`` on a WebSocket upgrade;
a Unix socket is guarded by its file mode instead). Bodies are bounded
(``--http-max-body``); output is held only in the bounded per-execution rings.
Errors are Blink's ``{"error": message}`` with a status that says whose fault.

About 440 lines, on purpose: every route is a few lines over the same guards,
the same error mapping and the same in-process clients (the WebSocket attach is
``attach``).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import secrets
import socket
import stat
from typing import Any

from aiohttp import web

from .. import __version__
from ..client import Client, Event, Output
from ..errors import ConnectionClosed, HttpError, RemoteError, clip
from ..listeners import bind_tcp, bind_unix, unlink_socket
from ..sessions import validate_name
from .access import check_http_address, cut, ensure_token, same_token
from .attach import Attacher
from .watch import ExecTable, exit_status

log = logging.getLogger("vhubd")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATUS = {
    "unknown_session": 404, "no_such_execution": 404, "bad_params": 400, "bad_session_name": 400,
    "bad_request": 400, "session_exists": 409, "boot_failed": 503, "no_agent": 503, "agent_lost": 503,
    "session_stopped": 503, "session_stopping": 503, "session_removed": 410, "too_many_requests": 429,
    "too_many_sessions": 429, "too_many_connections": 429, "timeout": 504, "spawn_failed": 422,
    "not_supported": 501, "stop_failed": 502, "not_exposed": 404, "exposed_already": 409, "listen_failed": 409,
    "bad_state": 409, "standby_failed": 502, "wake_failed": 502, "unknown_snapshot": 404, "snapshot_exists": 409,
    "too_many_snapshots": 429, "snapshot_failed": 502, "restore_failed": 502,
}


def _remote(exc: RemoteError | ConnectionClosed) -> HttpError:
    code = exc.code
    message = getattr(exc, "message", "") or str(exc)
    return HttpError(STATUS.get(code, 502), f"{code}: {message}" if code not in message else message)


class Api:
    """The HTTP API of one daemon."""

    def __init__(self, cfg: Any, server: Any, state_dir: str):
        self.cfg = cfg
        self.server = server
        self.kind, self.where = check_http_address(cfg.http, cfg.http_public)
        self.token = ensure_token(state_dir) if self.kind == "tcp" else None
        self.origins = {o.strip() for o in (cfg.http_origin or "").split(",") if o.strip()}
        self.table = ExecTable(server.connect_in_process, buffer=cfg.http_buffer, linger=cfg.http_linger,
                               max_executions=cfg.http_max_executions,
                               path=os.path.join(state_dir, "http-executions.json"))
        self.sock: socket.socket | None = None
        self.runner: web.AppRunner | None = None
        self.address: Any = None
        self.active = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.attacher = Attacher(self)
        self._star: Client | None = None
        self._star_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._expiry: asyncio.Task | None = None
        self._listener: asyncio.AbstractServer | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind first (a busy port is an error before anything starts)."""
        if self.kind == "unix":
            self.sock = bind_unix(self.where, 0o600)
            self.address = f"unix:{self.where}"
        else:
            self.sock = bind_tcp(*self.where)
            host, port = self.sock.getsockname()[:2]
            self.address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"

    async def restore(self, known) -> None:
        """Executions a previous daemon kept: their watchers connect now, before any
        guest is accepted (an agent resends what was not acknowledged at once)."""
        for session in self.table.load(known):
            try:
                await self.table.watcher(session)
            except (ConnectionClosed, RemoteError, OSError) as exc:
                self.table.end_session(session, f"cannot follow the session: {exc}")

    async def start(self) -> None:
        app = web.Application(middlewares=[self._guard], client_max_size=self.cfg.http_max_body)
        r = app.router
        r.add_get("/api/health", self.health)
        r.add_get("/api/product", self.product)
        r.add_get("/api/sessions", self.list_sessions)
        r.add_post("/api/sessions", self.open_session)
        r.add_get("/api/sessions/{name}", self.session_info)
        r.add_post("/api/sessions/{name}/stop", self.stop_session)
        r.add_delete("/api/sessions/{name}", self.remove_session)
        r.add_post("/api/sessions/{name}/runs", self.run)
        r.add_post("/api/sessions/{name}/spawn", self.spawn)
        r.add_get("/api/sessions/{name}/executions", self.list_executions)
        r.add_get("/api/sessions/{name}/ports", self.list_ports)
        r.add_post("/api/sessions/{name}/ports", self.expose)
        r.add_delete("/api/sessions/{name}/ports/{port}", self.unexpose)
        r.add_post("/api/sessions/{name}/standby", self.standby)
        r.add_post("/api/sessions/{name}/wake", self.wake)
        r.add_get("/api/sessions/{name}/checkpoints", self.list_checkpoints)
        r.add_post("/api/sessions/{name}/checkpoints", self.checkpoint)
        r.add_post("/api/sessions/{name}/checkpoints/{snapshot}/restore", self.restore_checkpoint)
        r.add_delete("/api/sessions/{name}/checkpoints/{snapshot}", self.remove_checkpoint)
        r.add_get("/api/sessions/{name}/executions/{id}/attach", self.attacher.attach)
        r.add_get("/", self.page)
        r.add_static("/static/", STATIC, append_version=False)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0,
                                    handler_cancellation=True)  # a client gone: its run stops
        await self.runner.setup()
        assert self.sock is not None
        # our own listener rather than a SockSite: connections are counted as they are
        # accepted, so a peer that opens many and sends nothing holds at most the bound
        self._listener = await asyncio.get_running_loop().create_server(self._protocol, sock=self.sock,
                                                                         backlog=256)
        self._expiry = asyncio.ensure_future(self._housekeeping(min(2.0, max(0.5, self.cfg.http_linger / 2))))
        log.info("http: the API and the web page on %s%s", self.address,
                 " (bearer token: blink http-token)" if self.token else " (Unix socket: its file mode guards it)")

    def _protocol(self) -> asyncio.BaseProtocol:
        assert self.runner is not None and self.runner.server is not None
        if len(self.runner.server.connections) >= self.cfg.http_max_connections:
            return _Busy(self.cfg.http_max_connections)
        return self.runner.server()

    async def _housekeeping(self, seconds: float) -> None:
        """Ended executions go once their linger is over, asked for or not; where
        the seqs stand is saved (a crash then keeps them)."""
        while True:
            await asyncio.sleep(seconds)
            self.table.expire()
            if self.table.dirty:
                try:
                    self.table.save(with_output=False)
                except OSError as exc:
                    log.warning("http: cannot save the executions' positions: %s", exc)

    async def stop_accepting(self) -> None:
        """Daemon shutdown, first step: no new requests; attached sockets are told."""
        if self._expiry is not None:
            self._expiry.cancel()
        self.table.closing = True
        closing = [asyncio.ensure_future(ws.close(code=1001, message=b"the daemon is restarting"))
                   for ws in list(self.sockets)]
        if closing:  # at once, and a client that never answers the close does not hold the restart up
            _, late = await asyncio.wait(closing, timeout=2.0)
            for t in late:
                t.cancel()
        if self._listener is not None:
            self._listener.close()
        if self.runner is not None:
            await self.runner.cleanup()
        if self.kind == "unix":
            unlink_socket(self.where)

    async def finish(self) -> None:
        """After the relay drained: keep the executions' output for the next daemon."""
        for w in list(self.table.watchers.values()):
            if w.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(w.task), 5)
                except (TimeoutError, Exception):
                    pass
        await self.table.close()
        if self._star is not None:
            await self._star.close()
        self.table.save()

    # -- guards ---------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        try:
            return await self._guarded(request, handler)
        except HttpError as exc:
            return web.json_response({"error": cut(exc.message, 400)}, status=exc.status)
        except web.HTTPException as exc:  # aiohttp's own: no such route, method not allowed...
            if exc.status < 400 or not request.path.startswith("/api/"):
                raise
            return web.json_response({"error": f"{exc.reason}: {request.method} {cut(request.path, 200)}"},
                                     status=exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            log.exception("http: %s %s failed", request.method, clip(request.path, 200))
            return web.json_response({"error": "internal error (the daemon's log has the details)"}, status=500)

    async def _guarded(self, request: web.Request, handler):
        origin = request.headers.get("Origin")
        cors = None
        if origin is not None and origin != f"{request.scheme}://{request.host}":
            if origin not in self.origins and "*" not in self.origins:
                raise HttpError(403, f"cross-origin request from {cut(origin, 100)} refused "
                                     "(blink serve --http-origin allows one)")
            cors = {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                    "Access-Control-Allow-Headers": "Authorization, Content-Type, Accept",
                    "Access-Control-Allow-Methods": "GET, POST, DELETE"}
            if request.method == "OPTIONS":
                return web.Response(status=204, headers=cors)
        if self.active >= self.cfg.http_max_connections:
            raise HttpError(503, f"too many HTTP requests at once (at most {self.cfg.http_max_connections})")
        if request.path.startswith("/api/") and self.token is not None:
            auth = request.headers.get("Authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
            if given is None and request.headers.get("Upgrade", "").lower() == "websocket":
                given = request.query.get("token")
            if not same_token(given, self.token):
                return web.json_response({"error": "missing or wrong bearer token (blink http-token prints it)"},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})
        self.active += 1
        try:
            resp = await handler(request)
        finally:
            self.active -= 1
        if cors and not resp.prepared:
            resp.headers.update(cors)
        return resp

    # -- helpers --------------------------------------------------------------------------
    async def star(self) -> Client:
        async with self._star_lock:
            if self._star is None or self._star.closed_reason is not None:
                sock = await self.server.connect_in_process()
                self._star = await Client.connect(sock=sock, session="*")
            return self._star

    async def call(self, method: str, params: dict, timeout: float | None = 60.0) -> Any:
        c = await self.star()
        try:
            return await c.call(method, params, timeout=timeout)
        except (RemoteError, ConnectionClosed) as exc:
            raise _remote(exc) from None
        except TimeoutError:
            raise HttpError(504, f"{method} did not answer in time") from None

    @staticmethod
    def name(request: web.Request) -> str:
        try:
            return validate_name(request.match_info["name"])
        except Exception as exc:
            raise HttpError(400, str(exc)) from None

    @staticmethod
    async def body(request: web.Request) -> dict:
        try:
            data = await request.json()
        except web.HTTPRequestEntityTooLarge as exc:
            raise HttpError(413, f"the body is too large: {exc.text}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the body is not JSON: {cut(str(exc), 100)}") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the body must be a JSON object")
        return data

    # -- REST -----------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"event": "health", "status": "ok", "version": __version__})

    async def product(self, request: web.Request) -> web.Response:
        info = await self.call("vhub.info", {})
        return web.json_response({
            "event": "product", "name": "vhub", "version": __version__, "backend": info.get("backend"),
            "sandbox": info.get("sandbox"),
            "features": {"sessions": True, "runs": True, "runs_ndjson": True, "spawn": True, "pty": True,
                         "attach": True, "attach_seq": True, "reattach_after_restart": True,
                         "warm_sessions": True, "web_terminal": True, "script": True, "files": False,
                         "ports": True, "standby": True, "checkpoints": bool(info.get("snapshots"))},
            "snapshot_enabled": bool(info.get("snapshots")),
            "limits": {"attach_buffer_bytes": self.cfg.http_buffer, "attach_linger_secs": self.cfg.http_linger,
                       "max_body_bytes": self.cfg.http_max_body}})

    async def list_sessions(self, request: web.Request) -> web.Response:
        c = await self.star()
        try:
            sessions = await c.sessions()
        except (RemoteError, ConnectionClosed) as exc:
            raise _remote(exc) from None
        return web.json_response({"event": "session_list", "sessions": sessions})

    async def open_session(self, request: web.Request) -> web.Response:
        body = await self.body(request)
        try:
            name = validate_name(body.get("name"))
        except Exception as exc:
            raise HttpError(400, f"name: {exc}") from None
        params: dict = {"session": name}
        if body.get("warm") is not None:
            params["warm"] = body["warm"]
        if body.get("image") is not None:
            params["image"] = body["image"]
        res = body.get("resources")
        if res is not None:
            if not isinstance(res, dict) or set(res) - {"cpus", "memory_mib"}:
                raise HttpError(400, "resources must be an object with cpus and/or memory_mib")
            params.update(res)
        result = await self.call("vhub.boot", params, timeout=None)
        info = await self.call("vhub.info", {"session": name})
        return web.json_response({"event": "session_opened", "session": name, "warm": bool(body.get("warm")),
                                  "booted": result.get("booted"), "boot_ms": result.get("boot_ms"),
                                  "info": _public(info)})

    async def session_info(self, request: web.Request) -> web.Response:
        info = await self.call("vhub.info", {"session": self.name(request)})
        return web.json_response({"event": "session_info", **_public(info)})

    async def stop_session(self, request: web.Request) -> web.Response:
        name = self.name(request)
        await self.call("vhub.info", {"session": name})  # an unknown session is 404, not created
        result = await self.call("vhub.stop", {"session": name}, timeout=None)
        return web.json_response({"event": "session_stopped", "session": name, "state": result.get("state")})

    async def remove_session(self, request: web.Request) -> web.Response:
        name = self.name(request)
        await self.call("vhub.remove", {"session": name}, timeout=None)
        return web.json_response({"event": "session_removed", "session": name})

    # -- ports (vhub.expose) and standby ------------------------------------------------------
    async def list_ports(self, request: web.Request) -> web.Response:
        name = self.name(request)
        await self.call("vhub.info", {"session": name})  # an unknown session is 404
        ports = await self.call("vhub.exposed", {"session": name})
        return web.json_response({"event": "port_list", "session": name, "ports": ports})

    async def expose(self, request: web.Request) -> web.Response:
        name = self.name(request)
        body = await self.body(request)
        port = body.get("port")
        if type(port) is not int or not 0 < port < 65536:
            raise HttpError(400, "port must be an integer from 1 to 65535")
        params: dict = {"session": name, "port": port}
        if body.get("listen") is not None:
            params["listen"] = body["listen"]
        exposure = await self.call("vhub.expose", params)
        return web.json_response({"event": "port_exposed", **exposure})

    async def unexpose(self, request: web.Request) -> web.Response:
        name = self.name(request)
        port = request.match_info["port"]
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
            raise HttpError(400, "the port must be an integer from 1 to 65535")
        result = await self.call("vhub.unexpose", {"session": name, "port": int(port)})
        return web.json_response({"event": "port_unexposed", **result})

    async def standby(self, request: web.Request) -> web.Response:
        result = await self.call("vhub.standby", {"session": self.name(request)}, timeout=None)
        return web.json_response({"event": "session_standby", **result})

    async def wake(self, request: web.Request) -> web.Response:
        result = await self.call("vhub.wake", {"session": self.name(request)}, timeout=None)
        return web.json_response({"event": "session_woken", **result})

    # -- checkpoints (vhub.snapshot, Blink's shapes) -------------------------------------------
    async def list_checkpoints(self, request: web.Request) -> web.Response:
        snaps = await self.call("vhub.snapshots", {"session": self.name(request)})
        return web.json_response({"event": "checkpoint_list", "snapshots": [
            {"name": s.get("name"), "id": s.get("id"), "created_at": s.get("created_at"),
             "size_bytes": s.get("size_bytes")} for s in snaps]})

    async def checkpoint(self, request: web.Request) -> web.Response:
        name = self.name(request)
        body = await self.body(request)
        if not isinstance(body.get("snapshot"), str):
            raise HttpError(400, "snapshot must be the checkpoint's name (a string)")
        params = {"session": name, "name": body["snapshot"], "stop": body.get("stop", False)}
        res = await self.call("vhub.snapshot", params, timeout=None)
        return web.json_response({"event": "session_checkpoint", "snapshot": res["snapshot"],
                                  "snapshot_id": res.get("id"), "created_at": res.get("created_at"),
                                  "size_bytes": res.get("size_bytes"), "state": res.get("state")})

    async def restore_checkpoint(self, request: web.Request) -> web.Response:
        name = self.name(request)
        res = await self.call("vhub.restore", {"session": name, "name": request.match_info["snapshot"]},
                              timeout=None)
        return web.json_response({"event": "session_restored", "name": name, "snapshot": res.get("snapshot"),
                                  "state": res.get("state"), "restore_ms": res.get("boot_ms")})

    async def remove_checkpoint(self, request: web.Request) -> web.Response:
        name = self.name(request)
        res = await self.call("vhub.remove_snapshot", {"session": name, "name": request.match_info["snapshot"]})
        return web.json_response({"event": "checkpoint_removed", "name": name, "snapshot": res.get("snapshot")})

    async def list_executions(self, request: web.Request) -> web.Response:
        name = self.name(request)
        self.table.expire()
        return web.json_response({"event": "execution_list", "session": name,
                                  "executions": [r.summary() for (s, _), r in self.table.records.items()
                                                 if s == name]})

    # -- runs (pipe mode) -----------------------------------------------------------------
    async def run(self, request: web.Request) -> web.StreamResponse:
        name = self.name(request)
        body = await self.body(request)
        script = _script(body) if "script" in body else None
        params = _command({**body, "command": "script"} if script else body)
        for key, kind in (("stdin", str),):
            if body.get(key) is not None and not isinstance(body[key], kind):
                raise HttpError(400, "stdin must be a string")
        if body.get("stdin") is not None:
            params["stdin"] = body["stdin"]
        t = body.get("timeout")
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 86400:
                raise HttpError(400, "timeout must be a number of seconds from 0 to 86400")
            params["timeout"] = t
        stream = "application/x-ndjson" in request.headers.get("Accept", "")
        await self.call("vhub.info", {"session": name})  # open it first (POST /api/sessions): else 404
        try:
            sock = await self.server.connect_in_process()
            client = await Client.connect(sock=sock, session=name, boot=True,
                                          subscribe=["stdout", "stderr", "events"], queue_size=8)
        except (ConnectionClosed, RemoteError) as exc:
            raise _remote(exc) from None
        try:
            if script is not None:  # Blink's {script}: the host file copied into the guest, then run
                params["argv"] = await self._copy_script(client, name, script) + params["argv"][1:]
            try:
                started = await client.call("agent.run", params, timeout=None)
            except (RemoteError, ConnectionClosed) as exc:
                raise _remote(exc) from None
            eid = started["execution_id"]
            try:
                return await self._run_output(request, client, eid, stream)
            except (asyncio.CancelledError, ConnectionError):
                # the HTTP client went away before the end: the command goes too (as Ctrl-C on blink run)
                task = asyncio.ensure_future(self._kill(name, eid))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                raise
        finally:
            await client.close()

    async def _copy_script(self, client: Client, session: str, script: tuple[str, bool]) -> list[str]:
        """Copy the script into the guest (a fresh path under /tmp, over a channel,
        sha256 checked); the argv that runs it (through /bin/sh when not executable)."""
        from ..filecopy import upload

        path, executable = script
        dest = f"/tmp/blink-script-{secrets.token_hex(8)}"
        try:
            await upload(client, session, path, dest, quiet=True)
        except (RemoteError, ConnectionClosed) as exc:
            raise _remote(exc) from None
        return [dest] if executable else ["/bin/sh", dest]

    async def _kill(self, session: str, eid: int) -> None:
        try:
            c = await self.star()
            await c.call("agent.kill", {"execution_id": eid, "signal": "SIGTERM"}, session=session, timeout=10)
        except (RemoteError, ConnectionClosed, TimeoutError):
            pass  # it ended meanwhile, or the session went

    async def _run_output(self, request: web.Request, client: Client, eid: int, stream: bool):
        limit = self.cfg.http_run_output
        dec = {"stdout": codecs.getincrementaldecoder("utf-8")("replace"),
               "stderr": codecs.getincrementaldecoder("utf-8")("replace")}
        kept: dict[str, list[str]] = {"stdout": [], "stderr": []}
        size = {"stdout": 0, "stderr": 0}
        truncated = {"stdout": False, "stderr": False}
        resp: web.StreamResponse | None = None
        if stream:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
        result: dict | None = None
        async for item in client:
            if type(item) is Output and item.request_id == eid and item.kind in dec:
                text = dec[item.kind].decode(item.data)
                if resp is not None:
                    if text:
                        await resp.write(_line({"event": item.kind, "data": text}))
                elif size[item.kind] + len(item.data) <= limit:
                    kept[item.kind].append(text)
                    size[item.kind] += len(item.data)
                else:
                    truncated[item.kind] = True
            elif type(item) is Event and item.data.get("type") == "execution_result" \
                    and item.data.get("execution_id") == eid:
                result = item.data
                break
        out: dict[str, Any] = {"event": "execution_result", "execution_id": str(eid)}
        for k in ("stdout", "stderr"):
            tail = dec[k].decode(b"", final=True)
            if resp is not None:
                if tail:
                    await resp.write(_line({"event": k, "data": tail}))
            else:
                out[k] = "".join(kept[k]) + tail
                if truncated[k]:
                    out[f"{k}_truncated"] = True
        if result is None:
            reason = str(client.closed_reason or "the session's connection closed")
            out.update(exit_code=None, error=f"the execution's end was not seen: {cut(reason, 200)}")
        else:
            out["exit_code"] = exit_status(result.get("exit_code"))
            if result.get("signal"):
                out["signal"] = result["signal"]
        if resp is not None:
            await resp.write(_line(out))
            await resp.write_eof()
            return resp
        return web.json_response(out, status=200 if result is not None else 502)

    # -- spawn + attach -------------------------------------------------------------------
    async def spawn(self, request: web.Request) -> web.Response:
        name = self.name(request)
        body = await self.body(request)
        params = _command(body)
        tty = body.get("tty", False)
        if not isinstance(tty, bool):
            raise HttpError(400, "tty must be true or false")
        if tty:
            for key, default in (("rows", 24), ("cols", 80)):
                v = body.get(key, default)
                if type(v) is not int or not 1 <= v <= 1000:
                    raise HttpError(400, f"{key} must be an integer from 1 to 1000")
                params[key] = v
            params["tty"] = True
            params.setdefault("env", {}).setdefault("TERM", "xterm-256color")
        else:
            params["stdin_stream"] = True
        if not self.table.room():
            raise HttpError(429, f"the daemon keeps at most {self.cfg.http_max_executions} executions; "
                                 "wait for one to end")
        await self.call("vhub.info", {"session": name})  # open it first (POST /api/sessions): else 404
        await self.call("vhub.boot", {"session": name}, timeout=None)  # a stopped session boots again
        try:
            rec = await self.table.spawn(name, params, tty=tty,
                                         command=" ".join([params["argv"][0], *params["argv"][1:]]))
        except (RemoteError, ConnectionClosed) as exc:
            raise _remote(exc) from None
        eid = str(rec.execution_id)
        return web.json_response({"event": "exec_spawned", "session": name, "execution_id": eid, "tty": tty,
                                  "attach_url": f"/api/sessions/{name}/executions/{eid}/attach"})

    # -- the page -------------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(os.path.join(STATIC, "index.html"), headers={
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                       "connect-src 'self' ws: wss:; img-src 'self' data:",
            "Cache-Control": "no-store"})


class _Busy(asyncio.Protocol):
    """A connection over ``--http-max-connections``: a 503 and close, nothing read."""

    def __init__(self, limit: int):
        self.limit = limit

    def connection_made(self, transport) -> None:
        body = json.dumps({"error": f"too many HTTP connections (at most {self.limit})"}).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        transport.close()


MAX_SCRIPT = 16 << 20


def _script(body: dict) -> tuple[str, bool]:
    """Blink's ``{script}``: an absolute path to a regular file on the daemon's
    host, read as the daemon's user (the API's token is an operator's key); the
    path and whether it is executable."""
    path = body.get("script")
    if not isinstance(path, str) or not path.startswith("/") or len(path) > 4096 or "\0" in path:
        raise HttpError(400, "script must be an absolute path to a file on the daemon's host")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise HttpError(400, f"script {clip(path)}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HttpError(400, f"script {clip(path)} is not a regular file")
    if st.st_size > MAX_SCRIPT:
        raise HttpError(413, f"script {clip(path)} is larger than {MAX_SCRIPT >> 20} MiB")
    return path, bool(st.st_mode & 0o111)


def _command(body: dict) -> dict:
    """Blink's {command, args, env, working_dir} as agent.run params (checked)."""
    command, args = body.get("command"), body.get("args", [])
    if not isinstance(command, str) or not command or len(command) > 4096:
        raise HttpError(400, "command must be a non-empty string (the program to run)")
    if args is None:
        args = []
    if not isinstance(args, list) or len(args) > 4096 or not all(isinstance(a, str) for a in args):
        raise HttpError(400, "args must be a list of strings")
    params: dict = {"argv": [command, *args]}
    env = body.get("env")
    if env is not None:
        if not isinstance(env, dict) or len(env) > 1024 or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise HttpError(400, "env must be an object of strings")
        params["env"] = dict(env)
    cwd = body.get("working_dir")
    if cwd is not None:
        if not isinstance(cwd, str) or not cwd:
            raise HttpError(400, "working_dir must be a non-empty string")
        params["cwd"] = cwd
    return params


def _public(info: dict) -> dict:
    """Session info without the daemon's internals."""
    out = {k: v for k, v in info.items() if k not in ("daemon", "token")}
    out["session"] = info.get("name")
    return out


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"
