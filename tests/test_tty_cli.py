"""``blink run -t`` driven as a person would: the test owns a pseudo-terminal pair
(the person's terminal), runs ``python -m vhubd run -t`` on its slave as the
controlling terminal, types on the master and reads what the screen gets, against
a real daemon (local backend) and the real guest agent. Every wait is bounded."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import statistics
import struct
import subprocess
import sys
import termios
import time

import pytest
from harness import ROOT, Daemon, wait_for

PY = sys.executable
PROMPT = b"tty> "
SETSID = "/usr/bin/setsid"

pytestmark = pytest.mark.skipif(not os.path.exists(SETSID), reason="needs util-linux setsid -c")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("ttyd")
    d = Daemon(base, "--backend", "local", "--state-dir", str(base / "state"), "--boot-timeout", "20").start()
    yield d
    d.stop()


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def stty_g(fd: int) -> str:
    r = subprocess.run(["stty", "-g"], stdin=fd, capture_output=True, timeout=5)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


class LocalTerminal:
    """A person's terminal: a PTY pair owned by the test, ``blink run ARGS`` on its
    slave (as controlling terminal, in its own session: it gets SIGWINCH)."""

    def __init__(self, daemon: Daemon, *args: str, rows: int = 24, cols: int = 80, env: dict | None = None,
                 command: str = "run"):
        self.master, self.slave = os.openpty()
        set_winsize(self.slave, rows, cols)
        self.before = stty_g(self.slave)
        self.screen = bytearray()  # everything read so far
        self.pos = 0  # read_until consumed up to here
        environ = dict(os.environ, TERM="xterm", **(env or {}))
        environ.pop("BLINK_CONTROL", None)
        self.proc = subprocess.Popen(
            [SETSID, "-c", PY, "-m", "vhubd", command, "--control", daemon.control, *args],
            stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=ROOT, env=environ)

    def _pump(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: nothing holds the slave (we do, so rare)
            return False
        self.screen += data
        return True

    def read_until(self, pattern: bytes, timeout: float = 10.0) -> bytes:
        """Output from the last match up to and including ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            i = self.screen.find(pattern, self.pos)
            if i >= 0:
                out = bytes(self.screen[self.pos:i + len(pattern)])
                self.pos = i + len(pattern)
                return out
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and not self._pump(0.2)):
                raise AssertionError(f"{pattern!r} not on the screen within {timeout}s "
                                     f"(blink rc={self.proc.poll()}): {bytes(self.screen[self.pos:])[-600:]!r}")
            self._pump(min(left, 0.2))

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def resize(self, rows: int, cols: int) -> None:
        set_winsize(self.master, rows, cols)  # the kernel sends SIGWINCH to blink

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"blink still running after {timeout}s: {bytes(self.screen)[-600:]!r}")
            self._pump(0.05)
        while self._pump(0.05):
            pass
        return self.proc.returncode

    def settings(self) -> str:
        return stty_g(self.slave)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminals():
    made: list[LocalTerminal] = []

    def make(daemon, *args, **kw) -> LocalTerminal:
        t = LocalTerminal(daemon, *args, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def shell(terminals, daemon, session: str, **kw) -> LocalTerminal:
    t = terminals(daemon, "-t", "-e", "PS1=" + PROMPT.decode(), session, "--", "sh", **kw)
    t.read_until(PROMPT, 20)
    return t


def test_interactive_shell_echo_size_and_restore(daemon, terminals):
    t = shell(terminals, daemon, "tty-sh")
    assert t.settings() != t.before  # raw mode while the remote shell runs
    t.type(b"echo $((6*7))\r")
    assert b"\r\n42\r\n" in t.read_until(PROMPT)
    t.type(b"stty size; tty\r")
    out = t.read_until(PROMPT)
    assert b"24 80\r\n" in out and b"/dev/pts/" in out
    t.resize(30, 100)
    deadline = time.monotonic() + 5  # the resize races the keys typed after it: ask again until it shows
    while True:
        t.type(b"stty size\r")
        if b"30 100\r\n" in t.read_until(PROMPT):
            break
        assert time.monotonic() < deadline, "the new window size never reached the remote terminal"
        time.sleep(0.1)
    t.type(b"exit 5\r")
    assert t.wait() == 5
    assert t.settings() == t.before


def test_ctrl_c_reaches_the_remote_program(daemon, terminals):
    t = shell(terminals, daemon, "tty-intr")
    t.type(b"sleep 100.25\r")

    def sleeper() -> int | None:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if f.read() == b"sleep\x00100.25\x00":
                            return int(pid)
                except OSError:
                    pass
        return None

    pid = wait_for(sleeper, 10, what="the remote sleep to start")
    t.type(b"\x03")
    wait_for(lambda: not running(pid), 5, what="sleep to die of ^C")
    t.type(b"echo status=$? after-$((1+1))\r")
    assert b"status=130 after-2\r\n" in t.read_until(b"after-2\r\n")
    assert t.proc.poll() is None  # ^C was a byte for the remote, not a signal for blink
    t.type(b"exit\r")
    assert t.wait() == 0
    assert t.settings() == t.before


CURSES = r"""
import curses, os, signal
winch = []  # our own handler: proves SIGWINCH arrived (ncurses' own can miss one right after a refresh)
signal.signal(signal.SIGWINCH, lambda *_: winch.append(1))
def main(s):
    s.timeout(50)
    s.addstr(0, 0, "FULLSCREEN %dx%d" % s.getmaxyx()); s.refresh()
    seen = 0
    while True:
        k = s.getch()
        if len(winch) > seen:
            seen = len(winch)
            size = os.get_terminal_size(0)
            curses.resizeterm(size.lines, size.columns)
            s.clear(); s.addstr(0, 0, "RESIZED %dx%d" % s.getmaxyx()); s.refresh()
        if k == ord("q"):
            return
curses.wrapper(main)
print("CURSES-DONE")
"""


def test_full_screen_programs_start_resize_and_quit(daemon, terminals):
    t = terminals(daemon, "-t", "tty-curses", "--", PY, "-c", CURSES)
    t.read_until(b"\x1b[?1049h", 20)  # xterm alternate screen
    t.read_until(b"FULLSCREEN 24x80")
    t.resize(40, 132)  # SIGWINCH here -> TtyResize -> SIGWINCH there -> KEY_RESIZE
    t.read_until(b"RESIZED 40x132")
    t.type(b"q")
    t.read_until(b"\x1b[?1049l")
    t.read_until(b"CURSES-DONE")
    assert t.wait() == 0
    assert t.settings() == t.before


def test_what_is_typed_right_after_a_resize_sees_the_new_size(daemon, terminals):
    """The window changes and the user types at once: blink finds the SIGWINCH
    and the typed bytes pending together (stopped meanwhile, as a loaded
    machine does to it), and asyncio runs a signal's handler a turn of the
    loop after the input it races. The program reads the new size, every time."""
    t = shell(terminals, daemon, "tty-race")
    for i, (rows, cols) in enumerate([(30, 100), (41, 121), (25, 81)]):
        t.proc.send_signal(signal.SIGSTOP)
        t.resize(rows, cols)
        t.type(b"stty size\r")
        t.proc.send_signal(signal.SIGCONT)
        got = t.read_until(PROMPT, 20)
        assert f"{rows} {cols}".encode() in got, (i, got)
    t.type(b"exit\r")
    assert t.wait() == 0


@pytest.mark.skipif(not os.path.exists("/usr/bin/vi"), reason="no vi on this host")
def test_vi_starts_and_quits(daemon, terminals):
    t = shell(terminals, daemon, "tty-vi")
    t.type(b"vi\r")
    t.read_until(b"\x1b[?1049h", 10)
    time.sleep(0.3)  # let vi settle (it queries the terminal)
    t.type(b"\x1b:q!\r")
    t.read_until(b"\x1b[?1049l", 10)
    t.read_until(PROMPT)
    t.type(b"exit\r")
    assert t.wait() == 0
    assert t.settings() == t.before


BINARY_OUT = "import os, tty; tty.setraw(0); os.write(1, b'BEGIN:' + bytes(range(256)) + b':END')"
BINARY_IN = ("import os, sys, tty; tty.setraw(0); os.write(1, b'READY\\n'); data = b''\n"
             "while len(data) < 256: data += os.read(0, 256 - len(data))\n"
             "os.write(1, b'GOT:' + data.hex().encode() + b':END')")


def test_binary_bytes_unchanged_both_ways_in_raw_mode(daemon, terminals):
    t = terminals(daemon, "-t", "tty-bin", "--", PY, "-c", BINARY_OUT)
    t.read_until(b"BEGIN:", 20)
    assert t.read_until(b":END") == bytes(range(256)) + b":END"
    assert t.wait() == 0
    assert t.settings() == t.before
    # and keyboard input: every byte value, ^C ^D ^Z ^] included (no escape key)
    t2 = terminals(daemon, "-t", "--escape", "none", "tty-bin", "--", PY, "-c", BINARY_IN)
    t2.read_until(b"READY", 20)
    t2.type(bytes(range(256)))
    assert t2.read_until(b":END") == b"\nGOT:" + bytes(range(256)).hex().encode() + b":END"
    assert t2.wait() == 0
    assert t2.settings() == t2.before


def test_detach_leaves_the_remote_running(daemon, terminals):
    t = shell(terminals, daemon, "tty-detach")
    t.type(b"echo still-here\r")
    t.read_until(PROMPT)
    t.type(b"\x1d")
    assert t.wait() == 0
    assert t.settings() == t.before
    assert b"detached" in t.read_until(b"keeps running")
    info = json.loads(daemon.cli("call", "tty-detach", "agent.info").stdout)
    assert len(info["executions"]) == 1
    eid = info["executions"][0]
    r = daemon.cli("call", "tty-detach", "agent.kill", json.dumps({"execution_id": eid, "signal": "SIGKILL"}))
    assert r.returncode == 0, r.stderr


def test_signal_hangs_up_and_restores(daemon, terminals):
    t = shell(terminals, daemon, "tty-sig")
    t.proc.send_signal(signal.SIGTERM)
    assert t.wait() == 128 + signal.SIGTERM
    assert t.settings() == t.before
    wait_for(lambda: json.loads(daemon.cli("call", "tty-sig", "agent.info").stdout)["executions"] == [], 10,
             what="the remote shell to be hung up")


def test_exit_codes_and_T(daemon, terminals):
    t = terminals(daemon, "-t", "tty-codes", "--", "sh", "-c", "printf 'on a tty: '; tty; exit 7")
    assert b"/dev/pts/" in t.read_until(b"\n", 20)
    assert t.wait() == 7
    t = terminals(daemon, "-t", "tty-codes", "--", "sh", "-c", "kill -TERM $$")
    assert t.wait(20) == 128 + signal.SIGTERM
    assert t.settings() == t.before
    # -T: plain pipes even on a terminal
    t = terminals(daemon, "-T", "tty-codes", "--", "sh", "-c", "tty; exit 3")
    assert b"not a tty" in t.read_until(b"not a tty", 20)
    assert t.wait() == 3
    assert t.settings() == t.before


def test_lost_daemon_restores_the_terminal(tmp_path, terminals):
    d = Daemon(tmp_path, "--backend", "local", "--state-dir", str(tmp_path / "state")).start()
    agent_pid = None
    try:
        t = shell(terminals, d, "tty-lost")
        agent_pid = json.loads(d.cli("call", "tty-lost", "agent.info").stdout)["pid"]
        d.stop(signal.SIGKILL)
        assert t.wait(15) == 1
        assert t.settings() == t.before
        assert b"ended before the program did" in bytes(t.screen)
    finally:
        d.stop()
        if agent_pid is not None:  # the daemon's local agent outlives a SIGKILLed daemon
            try:
                os.killpg(agent_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_keystroke_echo_latency(daemon, terminals, record_property):
    """p50 of a keystroke's echo through blink -> daemon -> agent -> remote pty and
    back, over 200 keystrokes (reported, not asserted)."""
    t = terminals(daemon, "-t", "tty-latency", "--", "sh", "-c", "echo READY; exec cat")
    t.read_until(b"READY\r\n", 20)
    samples = []
    for i in range(200):
        key = b"abcdefghij"[i % 10:i % 10 + 1]
        start = time.perf_counter()
        t.type(key)
        t.read_until(key, 5)
        samples.append(time.perf_counter() - start)
    t.type(b"\r\x04")
    assert t.wait() == 0
    p50 = statistics.median(samples) * 1000
    p90 = statistics.quantiles(samples, n=10)[-1] * 1000
    record_property("keystroke_echo_p50_ms", round(p50, 3))
    sys.stderr.write(f"\nkeystroke echo through the daemon: p50 {p50:.2f} ms, p90 {p90:.2f} ms (200 keys)\n")
