"""Socket activation and sd_notify for real: ``systemd-socket-activate``
holds the named sockets and execs ``blink serve`` on the first connection;
the daemon reports to a test-owned NOTIFY_SOCKET (READY=1, STATUS=,
WATCHDOG=1, STOPPING=1), checked to come from the main pid by
SCM_CREDENTIALS. Both notify/listen_fds implementations run every case."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from harness import ROOT, RawGuest, wait_for
from test_systemd import NotifySocket

from vhubd import systemd as sd
from vhubd.frames import MsgType

pytestmark = pytest.mark.systemd

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(SOCKET_ACTIVATE is None,
                                    reason="systemd-socket-activate is not installed (Debian: systemd)")


@pytest.fixture(params=sd.IMPLS)
def impl_name(request):
    try:
        sd.impl(request.param)
    except ImportError:
        pytest.skip("systemd-python is not installed (./dev installs the systemd extra)")
    return request.param


class Activated:
    """``systemd-socket-activate -l vhub.sock -l control.sock --fdname=vhub:control
    python -m vhubd serve ...`` with a NOTIFY_SOCKET we own."""

    def __init__(self, tmp_path, impl_name: str, *serve_args: str, listen=None, fdnames="vhub:control",
                 env: dict | None = None, watchdog_usec: int = 400000):
        self.dir = str(tmp_path)
        self.vhub = os.path.join(self.dir, "vhub.sock")
        self.control = os.path.join(self.dir, "control.sock")
        self.notify = NotifySocket(os.path.join(self.dir, "notify"))
        self.logpath = os.path.join(self.dir, "daemon.log")
        listen = listen if listen is not None else [self.vhub, self.control]
        envs = {"NOTIFY_SOCKET": self.notify.path, "BLINK_SYSTEMD": impl_name, **(env or {})}
        if watchdog_usec:
            envs["WATCHDOG_USEC"] = str(watchdog_usec)
        cmd = [SOCKET_ACTIVATE, *(f"--listen={a}" for a in listen)]
        if fdnames:
            cmd.append(f"--fdname={fdnames}")
        cmd += [f"--setenv={k}={v}" for k, v in envs.items()]
        cmd += [sys.executable, "-m", "vhubd", "serve", "--backend", "external",
                "--socket", os.path.join(self.dir, "flag-vhub.sock"),
                "--control", os.path.join(self.dir, "flag-control.sock"), *serve_args]
        self._log = open(self.logpath, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: self.log().count("Listening on ") == len(listen) or self.proc.poll() is not None, 10,
                 what="systemd-socket-activate listening")
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def exe(self) -> str:
        return os.path.basename(os.readlink(f"/proc/{self.proc.pid}/exe"))

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        self.notify.close()
        return self.proc.returncode


@pytest.fixture
def activated(tmp_path):
    made = []

    def make(*args, **kw):
        a = Activated(tmp_path / f"a{len(made)}", *args, **kw)
        made.append(a)
        return a

    (tmp_path / "a0").mkdir()
    (tmp_path / "a1").mkdir()
    yield make
    for a in made:
        a.stop()


def client_handshake(path: str, **hs) -> RawGuest:
    c = RawGuest(path)
    res = c.handshake({"role": "client", "session": "default", **hs})
    assert res[0] == "ok", res
    return c


@needs_activate
def test_first_connection_starts_the_daemon_on_named_fds(activated, impl_name):
    a = activated(impl_name)
    vhub_ino, control_ino = os.stat(a.vhub).st_ino, os.stat(a.control).st_ino
    time.sleep(0.3)
    assert "systemd-socket-activate" in a.exe() and a.notify.texts() == []  # nothing runs until a guest comes

    g = RawGuest(a.vhub)  # the first connection: systemd-socket-activate execs blink serve
    assert g.handshake(b"")[:2] == ("ok", b"blink-vhub-ready")
    _, pid, ready = a.notify.wait_for(lambda m: "READY=1" in m, what="READY=1")
    assert pid == a.proc.pid  # the main pid: socket-activate exec'd the daemon in place
    assert f"MAINPID={a.proc.pid}" in ready and "STATUS=" in ready
    assert "python" in a.exe()

    # a guest and a client talk through the daemon, on the sockets systemd made
    c = client_handshake(a.control, subscribe=["stdout"])
    g.send(MsgType.STDOUT, 0, b"hello from the guest")
    f = c.next_frame()
    assert f.msg_type == MsgType.STDOUT and bytes(f.payload) == b"hello from the guest"
    c.send(MsgType.RPC_REQUEST, 7, {"method": "agent.echo", "params": {"n": 1}})
    req = g.next_frame()
    assert req.msg_type == MsgType.RPC_REQUEST and json.loads(bytes(req.payload))["method"] == "agent.echo"
    g.send(MsgType.RPC_RESPONSE, req.request_id, {"echo": 1})
    resp = c.next_frame()
    assert resp.msg_type == MsgType.RPC_RESPONSE and resp.request_id == 7
    assert json.loads(bytes(resp.payload)) == {"echo": 1}

    # STATUS= follows the counts; WATCHDOG=1 every WATCHDOG_USEC/2 from the main pid
    a.notify.wait_for(lambda m: m.startswith("STATUS=") and "1 clients" in m, timeout=10, what="STATUS with a client")
    time.sleep(1.0)
    pets = [(t, p) for t, p, m in a.notify.messages if m == "WATCHDOG=1"]
    assert len(pets) >= 4 and all(p == a.proc.pid for _, p in pets)
    gaps = [b[0] - a_[0] for a_, b in zip(pets, pets[1:], strict=False)]
    assert 0.1 < sorted(gaps)[len(gaps) // 2] < 0.4  # every 0.2 s: half of WATCHDOG_USEC=400 ms
    assert all(pid == a.proc.pid for _, pid, _ in a.notify.messages)

    log = a.log()
    assert "socket activation: vhub listener from systemd" in log
    assert "socket activation: control listener from systemd" in log
    assert not os.path.exists(os.path.join(a.dir, "flag-vhub.sock"))  # --socket was not bound
    assert not os.path.exists(os.path.join(a.dir, "flag-control.sock"))

    # SIGTERM: STOPPING=1, the drain, exit 0; the sockets systemd made are left alone
    c.close()
    a.proc.send_signal(signal.SIGTERM)
    a.notify.wait_for(lambda m: m.startswith("STOPPING=1"), what="STOPPING=1")
    assert g.next_event(10) is not None  # the guest is told (Error shutting_down), then closed
    assert a.proc.wait(15) == 0, a.log()
    assert os.stat(a.vhub).st_ino == vhub_ino and os.stat(a.control).st_ino == control_ino
    texts = a.notify.texts()
    assert [m.split("\n")[0] for m in texts].count("READY=1") == 1
    stop_at = next(i for i, m in enumerate(texts) if m.startswith("STOPPING=1"))
    assert "WATCHDOG=1" not in texts[stop_at + 1:]
    g.close()


@needs_activate
def test_a_hung_event_loop_stops_the_watchdog_pets(activated, impl_name):
    """The debug hook (only when BLINK_DEBUG_HANG_ON_SIGUSR2 is set) blocks the
    loop with time.sleep: no WATCHDOG=1 while it is blocked, so systemd's
    watchdog would fire (the nspawn test lets it)."""
    a = activated(impl_name, env={"BLINK_DEBUG_HANG_ON_SIGUSR2": "2"}, watchdog_usec=300000)
    RawGuest(a.vhub).close()
    a.notify.wait_for(lambda m: "READY=1" in m)
    time.sleep(0.6)
    t_hang = time.monotonic()
    os.kill(a.proc.pid, signal.SIGUSR2)
    time.sleep(3.0)
    pets = [t for t, _, m in a.notify.messages if m == "WATCHDOG=1"]
    before = [t for t in pets if t < t_hang]
    assert len(before) >= 3
    during = [t for t in pets if t_hang + 0.2 < t < t_hang + 1.9]
    assert during == [], "WATCHDOG=1 was sent while the loop was blocked"
    assert [t for t in pets if t > t_hang + 2.0]  # it comes back with the loop
    assert "blocking the event loop" in a.log()


@needs_activate
def test_debug_hang_is_off_by_default(activated, impl_name):
    a = activated(impl_name)
    RawGuest(a.vhub).close()
    a.notify.wait_for(lambda m: "READY=1" in m)
    os.kill(a.proc.pid, signal.SIGUSR2)  # default action: terminate; proves no handler was installed
    assert a.proc.wait(10) == -signal.SIGUSR2


@needs_activate
def test_tcp_fd_is_the_token_guarded_guest_listener(activated, impl_name):
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    a = activated(impl_name, listen=[f"127.0.0.1:{port}"], fdnames="tcp")
    g = RawGuest(("127.0.0.1", port))
    res = g.handshake(b"")
    assert res[:2] == ("error", "token_required"), res
    g.close()
    a.notify.wait_for(lambda m: "READY=1" in m)
    assert "socket activation: tcp listener from systemd" in a.log()
    assert os.path.exists(os.path.join(a.dir, "flag-control.sock"))  # no "control" fd: bound by the daemon


@needs_activate
def test_unknown_fd_name_is_refused_with_a_clear_error(activated, impl_name):
    a = activated(impl_name, fdnames="vhub:blink-vhub.socket")
    g = RawGuest(a.vhub)
    assert a.proc.wait(15) == 1
    log = a.log()
    assert "blink-vhub.socket" in log and "FileDescriptorName" in log, log
    assert "Traceback" not in log
    assert a.notify.texts() == []  # never READY
    g.close()


@needs_activate
def test_once_mode_uses_the_activated_socket_and_leaves_it(activated, impl_name):
    a = activated(impl_name, "--once")
    g = RawGuest(a.vhub)
    assert g.handshake(b"")[:2] == ("ok", b"blink-vhub-ready")
    g.send(MsgType.RPC_REQUEST, 3, {"method": "report", "params": {"ok": True}})
    assert g.next_frame().msg_type == MsgType.RPC_RESPONSE
    assert a.proc.wait(15) == 0
    assert '{"method": "report", "params": {"ok": true}}' in a.log()
    assert os.path.exists(a.vhub)  # never unlinked
    g.close()


def test_fallback_binding_is_ready_only_once_listening(tmp_path):
    """Without socket activation the daemon binds its sockets itself, and
    READY=1 is sent only after they accept; at exit it removes what it bound."""
    from harness import Daemon

    d = Daemon(tmp_path, "--backend", "external")
    try:
        d.start()  # returns on READY=1 from the daemon's NOTIFY_SOCKET
        assert os.path.exists(d.socket) and os.path.exists(d.control)
        assert f"MAINPID={d.pid}" in d.ready_notice
        g = RawGuest(d.socket)
        assert g.handshake(b"")[0] == "ok"
        g.close()
        assert "(systemd)" not in d.log()
    finally:
        assert d.stop() == 0
    assert any(m.startswith("STOPPING=1") for m in d.notices)
    assert not os.path.exists(d.socket) and not os.path.exists(d.control)
