"""``blink expose`` against a real daemon and a real agent (local backend: the
"guest" is this host's loopback). The guest ports are real TCP servers: a
``python3 -m http.server`` started through ``blink run``, and servers in this
test process where a test needs to control the guest side (half-close, reset,
a server that never stops sending). Every client is a real socket or curl."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from harness import ROOT, Daemon, wait_for

PY = sys.executable
GUESTS: list = []  # closed when the module's daemon stops


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("expose"), "--backend", "local").start()
    r = d.cli("boot", "demo")
    assert r.returncode == 0, r.stderr
    yield d
    d.stop()
    for g in GUESTS:
        g.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expose(d, port: int, *extra: str, session: str = "demo") -> str:
    r = d.cli("expose", session, str(port), *extra, timeout=60)
    assert r.returncode == 0, r.stderr
    url = r.stdout.decode().strip()
    assert url.startswith("http://127.0.0.1:")
    return url


def address(url: str) -> tuple[str, int]:
    host, port = url[len("http://"):].rstrip("/").rsplit(":", 1)
    return host, int(port)


class Guest:
    """A TCP server on 127.0.0.1 (the local backend's guest network), one thread per connection."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.errors: list = []
        self.conns = 0
        GUESTS.append(self)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            self.handler(conn)
        except Exception as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self):
        self.sock.close()


def recv_all(s: socket.socket) -> bytes:
    out = bytearray()
    while True:
        d = s.recv(1 << 16)
        if not d:
            return bytes(out)
        out += d


def echo(conn):
    while True:
        d = conn.recv(65536)
        if not d:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(d)


def rst(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# ---------------------------------------------------------------- the scenario
@pytest.fixture(scope="module")
def http_server(local, tmp_path_factory):
    """``python3 -m http.server`` in the session, started with ``blink run``."""
    www = tmp_path_factory.mktemp("www")
    (www / "index.html").write_text("<h1>hello from the guest</h1>\n")
    (www / "big.bin").write_bytes(os.urandom(1 << 20))
    port = free_port()
    pidfile = www / "server.pid"
    r = subprocess.run([PY, "-m", "vhubd", "run", "--control", local.control, "-n", "demo", "--", "sh", "-c",
                        f"cd {www} && python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & "
                        f"echo $! > {pidfile}"], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    yield port, www
    try:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def test_http_server_in_the_guest_through_expose_with_curl(local, http_server):
    port, www = http_server
    url = expose(local, port, "--wait")  # returns once the server accepts
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (Debian: apt-get install curl)")
    r = subprocess.run(["curl", "-sS", "--max-time", "20", url + "index.html"], capture_output=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, b"<h1>hello from the guest</h1>\n"), r.stderr
    # listed in blink sessions and blink info
    table = local.cli("sessions").stdout.decode()
    assert f"{port}->{url[len('http://'):].rstrip('/')}" in table
    info = json.loads(local.cli("info", "demo", "--json").stdout)
    [exp] = [e for e in info["exposed"] if e["guest_port"] == port]
    assert exp["url"] == url and exp["accepted"] >= 1
    # exposing again answers the same exposure
    assert expose(local, port) == url


def test_64_concurrent_downloads_are_byte_exact(local, http_server):
    port, www = http_server
    url = expose(local, port, "--wait")
    want = hashlib.sha256((www / "big.bin").read_bytes()).hexdigest()
    host, hport = address(url)
    results: list = []

    def get():
        s = socket.create_connection((host, hport), timeout=60)
        s.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
        data = recv_all(s)
        s.close()
        head, _, body = data.partition(b"\r\n\r\n")
        results.append((head.split(b"\r\n")[0], hashlib.sha256(body).hexdigest()))

    threads = [threading.Thread(target=get) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 64
    assert all(r == (b"HTTP/1.0 200 OK", want) for r in results), results[:3]


def test_wait_gives_up_on_a_port_that_never_opens(local):
    r = local.cli("expose", "demo", str(free_port()), "--wait", "--timeout", "1", timeout=60)
    assert r.returncode == 1
    assert b"did not accept within 1 s" in r.stderr and len(r.stderr.splitlines()) == 1


# ---------------------------------------------------------------- TCP semantics
def test_256_concurrent_connections(local):
    g = Guest(echo)
    host, port = address(expose(local, g.port))
    rss0 = local.rss_kib()
    socks = [socket.create_connection((host, port), timeout=60) for _ in range(256)]
    for i, s in enumerate(socks):
        s.sendall(f"connection {i}\n".encode() * 100)
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    for i, s in enumerate(socks):
        assert recv_all(s) == f"connection {i}\n".encode() * 100
    assert local.rss_kib() - rss0 < 64 * 1024  # KiB, with 256 connections open
    for s in socks:
        s.close()
    assert g.conns == 256 and not g.errors
    info = json.loads(local.cli("info", "demo", "--json").stdout)
    assert wait_for(lambda: all(e["connections"] == 0 for e in
                                json.loads(local.cli("info", "demo", "--json").stdout)["exposed"]), 10)
    assert info["channels"] >= 0


def test_half_close_both_ways(local):
    got = {}

    def server(conn):
        got["request"] = recv_all(conn)  # until the client's half-close
        conn.sendall(b"answer after your EOF")
        conn.shutdown(socket.SHUT_WR)
        got["after"] = conn.recv(100)

    g = Guest(server)
    host, port = address(expose(local, g.port))
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"request")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"answer after your EOF"
    wait_for(lambda: "after" in got, 10)
    assert got == {"request": b"request", "after": b""}
    s.close()

    def server_first(conn):  # the guest half-closes first; the client goes on sending
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        got["late"] = recv_all(conn)

    g2 = Guest(server_first)
    host, port = address(expose(local, g2.port))
    s = socket.create_connection((host, port), timeout=30)
    assert recv_all(s) == b"banner"  # EOF: the guest's half-close
    s.sendall(b"still talking")
    s.shutdown(socket.SHUT_WR)
    wait_for(lambda: "late" in got, 10)
    assert got["late"] == b"still talking"
    s.close()


def test_reset_both_ways(local):
    seen = {}

    def server(conn):
        conn.sendall(b"hi")
        try:
            seen["read"] = conn.recv(100)
            seen["read2"] = conn.recv(100)
        except ConnectionResetError:
            seen["reset"] = True

    g = Guest(server)
    host, port = address(expose(local, g.port))
    s = socket.create_connection((host, port), timeout=30)
    assert s.recv(2) == b"hi"
    rst(s)  # the host's client resets: the guest's connection is reset
    wait_for(lambda: seen, 10)
    assert seen == {"reset": True}

    def resetting(conn):
        conn.sendall(b"partial")
        time.sleep(0.2)
        rst(conn)

    g2 = Guest(resetting)
    host, port = address(expose(local, g2.port))
    s = socket.create_connection((host, port), timeout=30)
    data = b""
    with pytest.raises(ConnectionResetError):
        while True:
            d = s.recv(100)
            assert d, "an orderly EOF instead of a reset"
            data += d
    assert data == b"partial"
    s.close()


def test_nobody_listening_gives_a_reset_and_says_why(local):
    port = free_port()
    host, hport = address(expose(local, port))
    try:  # the reset may come before connect() returns: the guest refuses that fast
        with socket.create_connection((host, hport), timeout=30) as s:
            got = s.recv(100)
    except ConnectionResetError:
        got = "reset"
    info = json.loads(local.cli("info", "demo", "--json").stdout)
    [exp] = [e for e in info["exposed"] if e["guest_port"] == port]
    assert got == "reset", (got, exp, local.log()[-2000:])
    assert exp["refused"] == 1, exp
    assert "connect_failed" in exp["last_refusal"] and f"127.0.0.1:{port}" in exp["last_refusal"]
    assert "Connection refused" in exp["last_refusal"]
    text = local.cli("info", "demo").stdout.decode()
    assert "last refusal: connect_failed" in text
    counters = local.call("vhub.stats")["counters"]
    assert counters["expose_refused"] >= 1 and counters["expose_accepted"] > counters["expose_refused"]
    wait_for(lambda: f"expose refused session=demo guest_port={port}" in local.log(), 5)


def test_port_that_closes_mid_stream_leaves_the_others_alone(local):
    chunk = os.urandom(1 << 16)

    def dying(conn):
        for _ in range(16):
            conn.sendall(chunk)
        rst(conn)

    g = Guest(dying)
    ok = Guest(echo)
    host, port = address(expose(local, g.port))
    host2, port2 = address(expose(local, ok.port))
    healthy = socket.create_connection((host2, port2), timeout=30)
    healthy.sendall(b"before")
    assert healthy.recv(6) == b"before"
    s = socket.create_connection((host, port), timeout=30)
    data = bytearray()
    with pytest.raises(ConnectionResetError):
        while True:
            d = s.recv(1 << 16)
            if not d:
                break
            data += d
    s.close()
    assert (chunk * 16).startswith(bytes(data))
    healthy.sendall(b"after")
    assert healthy.recv(5) == b"after"
    healthy.close()


def test_a_client_that_never_reads_holds_one_window_and_slows_nobody(local):
    sent = {"n": 0}
    blob = b"x" * (1 << 16)

    def firehose(conn):
        conn.settimeout(60)
        try:
            while True:
                conn.sendall(blob)
                sent["n"] += len(blob)
        except OSError:
            pass

    g = Guest(firehose)
    host, port = address(expose(local, g.port))
    rss0 = local.rss_kib()
    lazy = socket.create_connection((host, port), timeout=30)
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    samples = [sent["n"]]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (len(samples) < 3 or samples[-1] != samples[-3]):
        time.sleep(0.5)  # until the guest server is stuck (a second without progress)
        samples.append(sent["n"])
    held = samples[-1]
    # stuck: what it sent sits in kernel buffers, the agent's window, the daemon's, ours
    assert samples[-1] == samples[-3] and held > 0, samples
    assert held < 32 << 20
    # meanwhile other connections and the session's output flow
    ok = Guest(echo)
    host2, port2 = address(expose(local, ok.port))
    for _ in range(3):
        s = socket.create_connection((host2, port2), timeout=30)
        s.sendall(os.urandom(1 << 20))
        s.shutdown(socket.SHUT_WR)
        assert len(recv_all(s)) == 1 << 20
        s.close()
    r = subprocess.run([PY, "-m", "vhubd", "run", "--control", local.control, "-n", "demo", "--", "echo", "out"],
                       capture_output=True, timeout=60, cwd=ROOT)
    assert (r.returncode, r.stdout) == (0, b"out\n")
    assert local.rss_kib() - rss0 < 16 * 1024  # KiB: one window, not what the guest wanted to send
    lazy.close()


def test_unexpose_and_stop_close_listeners(local, make_daemon):
    g = Guest(echo)
    host, port = address(expose(local, g.port))
    s = socket.create_connection((host, port), timeout=30)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    r = local.cli("expose", "--remove", "demo", str(g.port))
    assert r.returncode == 0, r.stderr
    with pytest.raises(ConnectionResetError):
        s.recv(10)
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)
    r = local.cli("expose", "--remove", "demo", str(g.port))
    assert r.returncode == 1 and b"not_exposed" in r.stderr
    # a session that stops takes its exposures with it
    d = make_daemon("--backend", "local")
    assert d.cli("boot", "other").returncode == 0
    host, port = address(expose(d, g.port, session="other"))
    assert d.cli("stop", "other").returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5)
    assert json.loads(d.cli("info", "other", "--json").stdout)["exposed"] == []


def test_bad_input_is_one_line_and_nothing_breaks(local):
    for args, want in [
        (("nosuch", "8000"), b"unknown_session"),
        (("demo", "0"), b"bad_params"),
        (("demo", "70000"), b"bad_params"),
        (("demo", "8000", "--listen", "127.0.0.1:notaport"), b"bad_params"),
        (("demo", "8000", "--listen", "192.0.2.1:0"), b"listen_failed"),
    ]:
        r = local.cli("expose", *args)
        assert r.returncode == 1 and want in r.stderr and len(r.stderr.splitlines()) == 1, (args, r.stderr)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    r = local.cli("expose", "demo", "8001", "--listen", f"127.0.0.1:{busy.getsockname()[1]}")
    assert r.returncode == 1 and b"listen_failed" in r.stderr and b"in use" in r.stderr
    busy.close()
    assert local.cli("sessions").returncode == 0


def test_exposures_survive_a_daemon_restart(make_daemon, tmp_path):
    g = Guest(echo)
    state = str(tmp_path / "state")
    d = make_daemon("--backend", "local", "--state-dir", state)
    assert d.cli("boot", "keep").returncode == 0
    url = expose(d, g.port, session="keep")
    d.stop()
    d2 = make_daemon("--backend", "local", "--state-dir", state)
    info = json.loads(d2.cli("info", "keep", "--json").stdout)
    assert [e["url"] for e in info["exposed"]] == [url]  # the same address, bound again
    assert d2.cli("boot", "keep").returncode == 0  # the agent comes back
    s = socket.create_connection(address(url), timeout=30)
    s.sendall(b"again")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"again"
    s.close()
    assert d2.cli("rm", "keep").returncode == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address(url), timeout=5)


def test_an_agent_that_dies_resets_its_connections_and_the_exposure_stays(make_daemon):
    blob = os.urandom(1 << 16)

    def firehose(conn):
        try:
            while True:
                conn.sendall(blob)
        except OSError:
            pass

    g = Guest(firehose)
    d = make_daemon("--backend", "local")
    assert d.cli("boot", "dies").returncode == 0
    url = expose(d, g.port, session="dies")
    s = socket.create_connection(address(url), timeout=30)
    assert len(s.recv(1 << 16)) > 0
    pid = json.loads(d.cli("info", "dies", "--json").stdout)["agent"]["pid"]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ConnectionResetError):
        while s.recv(1 << 16):
            pass
    s.close()
    wait_for(lambda: not json.loads(d.cli("info", "dies", "--json").stdout)["agent_connected"], 20)
    try:  # no agent: a reset, and the operator is told why
        with socket.create_connection(address(url), timeout=30) as s2:
            got = s2.recv(10)
    except ConnectionResetError:
        got = "reset"
    assert got == "reset"
    [exp] = json.loads(d.cli("info", "dies", "--json").stdout)["exposed"]
    assert exp["url"] == url and "no_agent" in exp["last_refusal"]
    assert d.cli("boot", "dies").returncode == 0  # back: the same URL works again
    s3 = socket.create_connection(address(url), timeout=30)
    assert len(s3.recv(1 << 16)) > 0
    s3.close()


def test_an_open_connection_keeps_an_idle_session_up(make_daemon):
    g = Guest(echo)
    d = make_daemon("--backend", "local", "--idle-stop", "1")
    assert d.cli("boot", "idle").returncode == 0
    url = expose(d, g.port, session="idle")
    s = socket.create_connection(address(url), timeout=30)
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    time.sleep(3)  # three idle-stop periods without a byte: the open connection holds the session
    assert json.loads(d.cli("info", "idle", "--json").stdout)["state"] == "ready"
    assert "idle stop session=idle" not in d.log()
    s.sendall(b"y")
    assert s.recv(1) == b"y"
    s.close()
    wait_for(lambda: "idle stop session=idle" in d.log(), 20, what="idle stop once the connection closed")
    wait_for(lambda: json.loads(d.cli("info", "idle", "--json").stdout)["exposed"] == [], 10)


def test_a_hostile_guest_cannot_push_past_the_window(make_daemon):
    """A raw guest plays the agent: it accepts agent.connect, then floods the
    connection's channel without waiting for acks, to a client that does not
    read. The daemon holds one window, then resets that connection; the
    guest's other traffic and the daemon are fine."""
    from harness.peers import RawGuest

    from vhubd.frames import CHANNEL_WINDOW, MsgType

    d = make_daemon("--backend", "external")
    tok = d.call("vhub.register", {"session": "evil"})["token"]
    g = RawGuest(d.socket)
    assert g.handshake({"session": "evil", "token": tok})[0] == "ok"
    url = expose(d, 9999, session="evil")
    rss0 = d.rss_kib()
    lazy = socket.socket()  # never reads, and has room for little
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.settimeout(30)
    lazy.connect(address(url))
    req = g.next_frame(timeout=10)
    while json.loads(bytes(req.payload)).get("method") != "agent.connect":
        req = g.next_frame(timeout=10)
    params = json.loads(bytes(req.payload))["params"]
    cid = params["channel"]
    assert params["window"] == CHANNEL_WINDOW and params["port"] == 9999
    g.send(MsgType.RPC_RESPONSE, req.request_id, {"channel": cid, "window": CHANNEL_WINDOW})
    chunk = os.urandom(64 * 1024)
    for _ in range(32 * CHANNEL_WINDOW // len(chunk)):  # far more than the kernel buffers and the window
        g.send(MsgType.STREAM_DATA, cid, chunk)
    while True:  # the daemon resets the channel toward the guest
        f = g.next_frame(timeout=10)
        if f.msg_type == MsgType.RPC_REQUEST and json.loads(bytes(f.payload)).get("method") == "chan.reset":
            assert json.loads(bytes(f.payload))["params"] == {
                "channel": cid, "reason": "the guest sent past the channel's window"}
            break
    with pytest.raises(ConnectionResetError):  # and the host's client gets a reset
        while lazy.recv(1 << 16):
            pass
    lazy.close()
    assert d.rss_kib() - rss0 < 16 * 1024
    g.send(MsgType.STREAM_DATA, cid, b"after the reset")  # a channel that is gone: dropped
    counters = d.call("vhub.stats")["counters"]
    assert counters["channels_reset"] == 1
    wait_for(lambda: d.call("vhub.stats")["counters"]["channel_frames_dropped"] >= 1, 5)
    g.send(MsgType.RPC_REQUEST, 5, {"method": "vhub.ping", "params": {}})  # the guest is still served
    while True:
        f = g.next_frame(timeout=10)
        if f.msg_type == MsgType.RPC_RESPONSE and f.request_id == 5:
            break
    g.close()
