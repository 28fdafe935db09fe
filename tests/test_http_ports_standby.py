"""The HTTP API's ports (``vhub.expose`` behind ``/api/sessions/{name}/ports``)
and standby endpoints, against a real daemon on the local backend: a real TCP
server in the session, fetched through the exposed port; a session paused and
woken; bad bodies, unknown sessions and ports."""

from __future__ import annotations

import socket
import time

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the HTTP API needs the http extra (aiohttp)")

from harness import run  # noqa: E402
from harness.http import HttpApi  # noqa: E402

SERVER = ("import socket, sys\n"
          "s = socket.create_server(('127.0.0.1', int(sys.argv[1])))\n"
          "while True:\n"
          "    c, _ = s.accept(); c.sendall(b'hello from the guest'); c.close()\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fetch(port: int) -> bytes:
    """What the exposed port gives (nothing while the server is not up: the guest connect is reset)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            out = b""
            while chunk := c.recv(4096):
                out += chunk
            return out
    except ConnectionResetError:
        return b""


def test_ports_are_exposed_listed_and_removed_over_http(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "web"})
            port = _free_port()  # the local backend's "guest" loopback is this host's
            await api.ok("POST", "/api/sessions/web/spawn", {"command": "python3", "args": ["-c", SERVER, str(port)]})
            exposed = await api.ok("POST", "/api/sessions/web/ports", {"port": port, "listen": 0})
            assert exposed["event"] == "port_exposed" and exposed["session"] == "web"
            assert exposed["guest_port"] == port
            host_port = int(exposed["listen"].rpartition(":")[2])
            for _ in range(100):  # until the server in the session listens
                got = _fetch(host_port)
                if got:
                    break
                time.sleep(0.1)
            assert got == b"hello from the guest"
            ports = await api.ok("GET", "/api/sessions/web/ports")
            assert ports["event"] == "port_list" and [p["guest_port"] for p in ports["ports"]] == [port]
            removed = await api.ok("DELETE", f"/api/sessions/web/ports/{port}")
            assert removed["event"] == "port_unexposed" and removed["removed"] is True
            assert (await api.ok("GET", "/api/sessions/web/ports"))["ports"] == []
            for method, path, body, want in (
                    ("POST", "/api/sessions/web/ports", {"port": 0}, 400),
                    ("POST", "/api/sessions/web/ports", {"port": "80"}, 400),
                    ("POST", "/api/sessions/web/ports", [], 400),
                    ("DELETE", "/api/sessions/web/ports/99999", None, 400),
                    ("DELETE", "/api/sessions/web/ports/٣", None, 400),
                    ("DELETE", f"/api/sessions/web/ports/{port}", None, 404),
                    ("GET", "/api/sessions/nope/ports", None, 404),
                    ("POST", "/api/sessions/nope/ports", {"port": 80}, 404)):
                status, data = await api.req(method, path, body)
                assert status == want and data["error"], (method, path, status, data)

    run(body(), timeout=90)


def test_standby_and_wake_over_http(api_daemon):
    async def body():
        async with HttpApi(api_daemon) as api:
            await api.ok("POST", "/api/sessions", {"name": "sl"})
            res = await api.ok("POST", "/api/sessions/sl/standby")
            assert res["event"] == "session_standby" and res["state"] == "standby"
            assert (await api.ok("GET", "/api/sessions/sl"))["state"] == "standby"
            ran = await api.ok("POST", "/api/sessions/sl/runs", {"command": "echo", "args": ["awake"]})
            assert ran["stdout"] == "awake\n" and ran["exit_code"] == 0  # a run wakes it
            await api.ok("POST", "/api/sessions/sl/standby")
            woke = await api.ok("POST", "/api/sessions/sl/wake")
            assert woke["event"] == "session_woken" and woke["woken"] is True and woke["state"] == "ready"
            status, data = await api.req("POST", "/api/sessions/default/standby")
            assert status == 409 and "bad_state" in data["error"]
            status, data = await api.req("POST", "/api/sessions/nope/wake")
            assert status == 404

    run(body(), timeout=90)
