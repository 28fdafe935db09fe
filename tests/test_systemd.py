"""vhubd.systemd in-process: both implementations of notify / listen_fds
(libsystemd and stdlib) against a test-owned NOTIFY_SOCKET and real
listening sockets, the watchdog petted from the event loop, journald fields,
logging choices and install-units."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import threading
import time

import pytest

from vhubd import journal, units
from vhubd import systemd as sd
from vhubd.daemon import DaemonConfig, make_listeners


@pytest.fixture(params=sd.IMPLS)
def impl(request):
    try:
        return sd.impl(request.param)
    except ImportError:
        pytest.skip("systemd-python is not installed (./dev installs the systemd extra)")


class NotifySocket:
    """A Unix datagram socket standing in for systemd's notify socket. A
    thread reads it as systemd would (promptly: an unread queue of 10
    datagrams would block the sender) and records each message with its
    arrival time and the sender's pid (SCM_CREDENTIALS)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, int | None, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = None
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", data)[0]
            self.messages.append((time.monotonic(), pid, msg.decode()))

    def texts(self) -> list[str]:
        return [m for _, _, m in self.messages]

    def wait_for(self, pred, timeout: float = 10.0, what: str = "notify message"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, pid, msg in list(self.messages):
                if pred(msg):
                    return t, pid, msg
            time.sleep(0.01)
        raise TimeoutError(f"no {what} within {timeout} s; got {self.texts()}")

    def settle(self, seconds: float = 0.2) -> list[str]:
        time.sleep(seconds)
        return self.texts()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    ns = NotifySocket(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", ns.path)
    yield ns
    ns.close()


def test_impl_chooser_names_both(monkeypatch):
    assert sd.IMPL.name in sd.IMPLS
    assert sd.impl("stdlib").name == "stdlib"
    with pytest.raises(ValueError):
        sd.impl("nope")


def test_notify_reaches_the_socket_with_our_pid(impl, notify_socket):
    assert impl.notify("READY=1\nSTATUS=hello") is True
    _, pid, msg = notify_socket.wait_for(lambda m: True)
    assert msg == "READY=1\nSTATUS=hello" and pid == os.getpid()


def test_notify_abstract_socket(impl, monkeypatch):
    name = f"vhub-test-{os.getpid()}-{time.monotonic_ns()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert impl.notify("WATCHDOG=1")
        s.settimeout(5)  # one datagram: the queue cannot fill
        assert s.recv(100) == b"WATCHDOG=1"
    finally:
        s.close()


def test_notify_without_socket_is_a_noop(impl, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert impl.notify("READY=1") is False
    n = sd.Notifier(impl)
    assert not n.enabled
    n.ready("x")
    n.stopping("y")  # nothing to send, nothing raised


def _listener(kind="unix", path=None):
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(8)
    elif kind == "tcp":
        s = socket.create_server(("127.0.0.1", 0))
    elif kind == "dgram":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)  # bound, not listening
    return s


@pytest.fixture
def pass_fds(monkeypatch):
    """Place sockets at consecutive fds as systemd would (at a high start,
    so the test's own fds are untouched) and set LISTEN_* for this pid."""
    placed = []
    start = 200

    def place(socks, names=None, pid=None):
        for i, s in enumerate(socks):
            os.dup2(s.fileno(), start + i)
            placed.append(start + i)
            s.close()
        monkeypatch.setattr(sd, "LISTEN_FDS_START", start)
        monkeypatch.setenv("LISTEN_FDS", str(len(socks)))
        monkeypatch.setenv("LISTEN_PID", str(pid or os.getpid()))
        if names is not None:
            monkeypatch.setenv("LISTEN_FDNAMES", ":".join(names))
        return list(range(start, start + len(socks)))

    yield place
    for fd in placed:
        try:
            os.close(fd)
        except OSError:
            pass


def test_stdlib_listen_fds_by_name_and_env_unset(tmp_path, pass_fds):
    fds = pass_fds([_listener(path=str(tmp_path / "v")), _listener(path=str(tmp_path / "c")), _listener("tcp")],
                   ["vhub", "control", "tcp"])
    got = sd.activation_sockets(sd.impl("stdlib"))
    assert sorted(got) == ["control", "tcp", "vhub"]
    assert got["vhub"][0].getsockname() == str(tmp_path / "v")
    assert got["tcp"][0].family == socket.AF_INET
    assert all(not os.get_inheritable(fd) for fd in fds)  # local-backend children never get them
    assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(os.environ)
    for socks in got.values():
        for s in socks:
            s.detach()


def test_listen_fds_for_another_pid_are_ignored_and_the_env_unset(impl, monkeypatch):
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "vhub")
    assert impl.listen_fds_with_names(True) == {}
    assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(os.environ)  # what children would inherit


def test_stdlib_listen_fds_for_another_pid_are_ignored(tmp_path, pass_fds):
    pass_fds([_listener(path=str(tmp_path / "v"))], ["vhub"], pid=1)
    assert sd.activation_sockets(sd.impl("stdlib")) == {}
    assert "LISTEN_FDS" not in os.environ


def test_single_unnamed_fd_is_the_guest_socket(tmp_path, pass_fds):
    pass_fds([_listener(path=str(tmp_path / "v"))])
    got = sd.activation_sockets(sd.impl("stdlib"))
    assert list(got) == ["vhub"]
    got["vhub"][0].detach()


@pytest.mark.parametrize("kind,names,message", [
    ("unix", ["blink-vhub.socket"], "FileDescriptorName"),
    ("dgram", ["vhub"], "not a listening socket"),
    ("bound", ["vhub"], "Accept=no"),
    ("tcp", ["control"], "must be a Unix socket"),
    ("unix", ["tcp"], "must be a TCP socket"),
])
def test_unusable_activation_sockets_are_one_clear_error(tmp_path, pass_fds, kind, names, message):
    pass_fds([_listener(kind, str(tmp_path / "s"))], names)
    with pytest.raises(sd.ActivationError, match=message):
        sd.activation_sockets(sd.impl("stdlib"))


def test_make_listeners_prefers_inherited_and_never_owns_them(tmp_path):
    guest = _listener(path=str(tmp_path / "from-systemd.sock"))
    guest.setblocking(False)
    cfg = DaemonConfig(socket=str(tmp_path / "flag.sock"), control=str(tmp_path / "control.sock"))
    specs = make_listeners(cfg, {"vhub": [guest]})
    try:
        by = {s.name: s for s in specs}
        assert by["vhub"].sock is guest and by["vhub"].owned_path is None and by["vhub"].activated
        assert not os.path.exists(cfg.socket)  # --socket is not bound when systemd passed "vhub"
        assert by["control"].owned_path == cfg.control and not by["control"].activated  # fallback: bound here
    finally:
        for s in specs:
            s.sock.close()


def test_watchdog_usec_respects_watchdog_pid():
    assert sd.watchdog_usec({"WATCHDOG_USEC": "4000000"}) == 4000000
    assert sd.watchdog_usec({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}) == 4000000
    assert sd.watchdog_usec({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert sd.watchdog_usec({"WATCHDOG_USEC": "0"}) is None
    assert sd.watchdog_usec({}) is None


def test_notifier_pets_from_the_loop_and_a_blocked_loop_stops_the_pets(impl, notify_socket, monkeypatch):
    """WATCHDOG=1 every WATCHDOG_USEC/2 from a loop callback; while the loop
    is blocked nothing is sent (so systemd would catch the hang)."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pet every 0.1 s
    n = sd.Notifier(impl, status_interval=0.15)
    assert n.watchdog_interval == pytest.approx(0.1)
    counts = iter(range(100))

    async def body():
        n.ready("starting")
        n.start(asyncio.get_running_loop(), lambda: f"{next(counts)} sessions")
        await asyncio.sleep(0.5)
        t_block = time.monotonic()
        time.sleep(0.6)  # the loop is hung
        t_unblock = time.monotonic()
        await asyncio.sleep(0.3)
        n.stopping("draining 0 connections")
        await asyncio.sleep(0.2)
        return t_block, t_unblock

    t_block, t_unblock = asyncio.run(body())
    notify_socket.settle()
    msgs = notify_socket.messages
    texts = notify_socket.texts()
    assert texts[0].startswith("READY=1\nSTATUS=starting")
    assert all(pid == os.getpid() for _, pid, _ in msgs)
    pets = [t for t, _, m in msgs if m == "WATCHDOG=1"]
    assert len([t for t in pets if t < t_block]) >= 4
    assert not [t for t in pets if t_block + 0.05 < t < t_unblock]  # a hung loop pets nothing
    assert [t for t in pets if t > t_unblock]  # and petting resumes with the loop
    assert any(m.startswith("STATUS=") and "sessions" in m for m in texts)
    assert texts[-1] == "STOPPING=1\nSTATUS=draining 0 connections"
    assert "WATCHDOG=1" not in texts[texts.index(texts[-1]):][1:]  # stopped petting once stopping


def test_status_is_sent_only_when_it_changes(notify_socket):
    n = sd.Notifier(sd.impl("stdlib"))
    n.status("1 sessions")
    n.status("1 sessions")
    n.status("2 sessions")
    assert notify_socket.settle() == ["STATUS=1 sessions", "STATUS=2 sessions"]


# --- journald fields and logging ------------------------------------------------------

@pytest.mark.parametrize("fmt,args,event,fields", [
    ("guest attached session=%s peer=%s", ("s1", "vhub:pid=1"), "guest_attached",
     {"VHUB_SESSION": "s1", "VHUB_PEER": "vhub:pid=1"}),
    ("closing peer=%s code=%s %s", ("p", "stalled", "why"), "closing", {"VHUB_PEER": "p", "VHUB_CODE": "stalled"}),
    ("session booted session=%s backend=%s in %.0f ms", ("a", "local", 12.0), "session_booted",
     {"VHUB_SESSION": "a", "VHUB_BACKEND": "local"}),
    ("refused peer=%s: too many connections (%d)", ("x", 3), "refused", {"VHUB_PEER": "x"}),
    ("shutting down: draining %d connections", (2,), "shutting_down", {}),
    ("100%% sure session=%s", ("z",), "100", {"VHUB_SESSION": "z"}),
    ("stopped", (), "stopped", {}),
])
def test_record_fields_from_the_format_string(fmt, args, event, fields):
    rec = logging.LogRecord("vhubd", logging.INFO, __file__, 1, fmt, args, None)
    assert journal.record_fields(rec) == {"VHUB_EVENT": event, **fields}


def test_other_loggers_get_no_derived_fields():
    rec = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Task was destroyed peer=%s", ("x",), None)
    assert journal.record_fields(rec) == {}


def test_explicit_extra_fields_win():
    rec = logging.LogRecord("vhubd", logging.INFO, __file__, 1, "guest attached session=%s", ("a",), None)
    rec.vhub_session = "b"
    rec.vhub_event = "custom"
    assert journal.record_fields(rec) == {"VHUB_EVENT": "custom", "VHUB_SESSION": "b"}


def test_journal_handler_sends_structured_entries():
    sent = []
    h = journal.JournalHandler(send=lambda msg, **kw: sent.append((msg, kw)))
    log = logging.getLogger("vhubd.test-journal")
    log.propagate = False
    log.addHandler(h)
    try:
        log.warning("protocol violation session=%s peer=%s code=%s %s", "s1", "vhub:pid=9", "bad_magic", "no")
    finally:
        log.removeHandler(h)
    (msg, kw), = sent
    assert msg == "protocol violation session=s1 peer=vhub:pid=9 code=bad_magic no"
    assert kw["PRIORITY"] == "4" and kw["SYSLOG_IDENTIFIER"] == "vhubd"
    assert kw["VHUB_EVENT"] == "protocol_violation" and kw["VHUB_SESSION"] == "s1"
    assert kw["VHUB_PEER"] == "vhub:pid=9" and kw["VHUB_CODE"] == "bad_magic"
    assert kw["CODE_FUNC"] == "test_journal_handler_sends_structured_entries"
    assert isinstance(kw["CODE_LINE"], int)  # journal.send formats it with {:d}


def test_journal_handler_through_the_real_journal_send(monkeypatch):
    """systemd.journal.send itself (only its final C call captured): the
    fields come out as the KEY=value lines journald receives."""
    sj = pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    lines = []
    monkeypatch.setattr(sj, "sendv", lambda *args: lines.extend(args))
    h = journal.JournalHandler()
    h.emit(logging.LogRecord("vhubd", logging.WARNING, __file__, 42, "closing peer=%s code=%s %s",
                             ("vhub:pid=1", "stalled", "slow"), None))
    assert "MESSAGE=closing peer=vhub:pid=1 code=stalled slow" in lines
    assert {"PRIORITY=4", "CODE_LINE=42", "VHUB_EVENT=closing", "VHUB_PEER=vhub:pid=1", "VHUB_CODE=stalled",
            "SYSLOG_IDENTIFIER=vhubd"} <= set(lines), lines


def test_journal_handler_uses_systemd_python():
    pytest.importorskip("systemd.journal", reason="systemd-python is not installed")
    from systemd import journal as sj

    assert journal.JournalHandler()._send is sj.send


def test_priorities():
    assert [journal.priority(lv) for lv in (10, 20, 30, 40, 50)] == [7, 6, 4, 3, 2]


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _stderr_journal_stream(monkeypatch, tmp_path):
    f = open(tmp_path / "stderr", "w")
    monkeypatch.setattr(sys, "stderr", f)
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    return f


def test_logging_choice(monkeypatch, tmp_path, restore_logging):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert journal.configure_logging("auto") == "stderr"
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # not our stderr (e.g. inherited by a child)
    assert journal.configure_logging("auto") == "stderr"
    f = _stderr_journal_stream(monkeypatch, tmp_path)
    try:
        expected = "journal" if sd.IMPL.name == "libsystemd" else "stderr-prefixed"
        assert journal.configure_logging("auto") == expected
        assert journal.configure_logging("stderr") == "stderr"
    finally:
        f.close()


def test_without_systemd_python_under_systemd_lines_carry_priorities(monkeypatch, tmp_path, restore_logging):
    monkeypatch.setitem(sys.modules, "systemd.journal", None)  # as if systemd-python were absent
    monkeypatch.setitem(sys.modules, "systemd", None)
    f = _stderr_journal_stream(monkeypatch, tmp_path)
    assert journal.configure_logging("auto") == "stderr-prefixed"
    logging.getLogger("vhubd").warning("closing peer=%s", "p")
    logging.getLogger("vhubd").info("two\nlines")
    f.flush()
    assert (tmp_path / "stderr").read_text() == "<4>closing peer=p\n<6>two\n<6>lines\n"
    with pytest.raises(ImportError):
        journal.configure_logging("journal")
    f.close()


# --- install-units -----------------------------------------------------------------

def test_install_units_rewrites_exec_start(tmp_path):
    written = units.install_units(str(tmp_path), "external", ["/opt/blink venv/bin/blink"])
    unit_dir = tmp_path / "etc/systemd/system"
    svc = (unit_dir / "blink-vhub.service").read_text()
    assert "ExecStart='/opt/blink venv/bin/blink' serve --socket /run/blink/vhub.sock" in svc
    assert "/usr/bin/blink" not in svc
    assert (unit_dir / "blink-vhub.socket").exists() and (unit_dir / "blink-vhub-control.socket").exists()
    assert (tmp_path / "etc/sysusers.d/blink-vhub.conf").read_text().count("u blink") == 1
    assert str(unit_dir / "blink-vhub.service") in written


@pytest.mark.parametrize("variant", ["local", "boxlite"])
def test_install_units_variant_dropin(tmp_path, variant):
    units.install_units(str(tmp_path), variant, ["/usr/local/bin/blink"])
    dropin = (tmp_path / f"etc/systemd/system/blink-vhub.service.d/{variant}.conf").read_text()
    assert f"ExecStart=/usr/local/bin/blink serve --socket /run/blink/vhub.sock " \
           f"--control /run/blink/control.sock --backend {variant}" in dropin


def test_install_units_makes_code_under_home_visible(tmp_path, monkeypatch):
    monkeypatch.setattr(units, "code_paths", lambda: ["/root/.pyenv/versions/3.11.7", "/srv/app"])
    units.install_units(str(tmp_path), "external", ["/root/.pyenv/versions/3.11.7/bin/blink"])
    conf = (tmp_path / "etc/systemd/system/blink-vhub.service.d/code-paths.conf").read_text()
    assert "ProtectHome=tmpfs" in conf and "BindReadOnlyPaths=/root/.pyenv/versions/3.11.7\n" in conf
    assert "/srv/app" not in conf


def test_install_units_makes_code_under_tmp_visible(tmp_path, monkeypatch):
    """A checkout under /tmp (a CI clone, say) is hidden by PrivateTmp=yes."""
    monkeypatch.setattr(units, "code_paths", lambda: ["/usr", "/tmp/ci/clone"])
    units.install_units(str(tmp_path), "external", ["/tmp/ci/clone/.venv/bin/blink"])
    conf = (tmp_path / "etc/systemd/system/blink-vhub.service.d/code-paths.conf").read_text()
    assert "BindReadOnlyPaths=/tmp/ci/clone\n" in conf and "ProtectHome=tmpfs" not in conf


def test_install_units_cli(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "vhubd", "install-units", "--prefix", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    svc = (tmp_path / "etc/systemd/system/blink-vhub.service").read_text()
    exe = svc.split("ExecStart=", 1)[1].split(" serve ", 1)[0]
    assert os.access(exe.split()[0], os.X_OK), exe


@pytest.mark.parametrize("impl_name", ["stdlib", "libsystemd"])
def test_status_and_watchdog_never_block_on_a_reader_that_is_behind(tmp_path, monkeypatch, impl_name):
    """A NOTIFY_SOCKET whose reader does not keep up (its datagram queue is
    full): STATUS= and WATCHDOG=1 are dropped, the event loop is never held.
    (Our test harness once hung a daemon this way: libsystemd's sd_notify blocks.)"""
    try:
        implementation = sd.impl(impl_name)
    except ImportError:
        pytest.skip("systemd-python is not installed (the systemd extra)")
    path = str(tmp_path / "notify")
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = sd.Notifier(implementation)
    t0 = time.monotonic()
    for i in range(5000):
        n.status(f"{i} sessions")
        n._send_nowait("WATCHDOG=1")
    assert time.monotonic() - t0 < 5
    reader.setblocking(False)
    got = 0
    with contextlib.suppress(BlockingIOError):
        while reader.recv(4096):
            got += 1
    assert 0 < got < 10_000  # the queue filled and the rest was dropped, not waited for
    reader.close()
