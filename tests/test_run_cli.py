"""``blink run`` on pipes against a real daemon and real agents (local backend):
stdin forwarded as a stream (small, large, slow readers, EOF, a command that
closes it early, ``-n``), exit codes like a shell's, usage errors, ``-t``
without a terminal. And the agent's side of streamed stdin on its own: bounded
against a host that ignores the window."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "guest-agent"))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    from harness import Daemon

    d = Daemon(tmp_path_factory.mktemp("run"), "--backend", "local").start()
    yield d
    d.stop()


def run(d, *args: str, input: bytes | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "vhubd", "run", "--control", d.control, *args], input=input,
                          capture_output=True, timeout=timeout, cwd=ROOT)


def test_stdin_reaches_the_command_with_its_eof(local):
    assert run(local, "demo", "--", "true").returncode == 0  # booted: no boot lines on stderr from now on
    r = run(local, "demo", "--", "wc", "-l", input=b"a\nb\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"2\n", b"")
    r = run(local, "demo", "--", "cat", input=b"no newline at the end")  # cat ends only at EOF
    assert (r.returncode, r.stdout) == (0, b"no newline at the end")
    r = run(local, "demo", "--", "cat", input=b"")
    assert (r.returncode, r.stdout) == (0, b"")


def test_large_stdin_through_a_slow_reader(local):
    data = os.urandom(6 << 20)
    r = run(local, "demo", "--", "sh", "-c", "sleep 1; sha256sum", input=data, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    binary = bytes(range(256)) * 4096
    r = run(local, "demo", "--", "cat", input=binary, timeout=120)
    assert r.returncode == 0 and r.stdout == binary


def test_stdin_from_a_file_and_a_command_that_stops_reading(local, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"line\n" * 100_000)
    with open(path, "rb") as f:
        r = subprocess.run([PY, "-m", "vhubd", "run", "--control", local.control, "demo", "--", "head", "-n", "2"],
                           stdin=f, capture_output=True, timeout=60, cwd=ROOT)
    assert (r.returncode, r.stdout) == (0, b"line\nline\n")
    # an endless stdin: the command's end ends blink run, whatever stdin still has
    with subprocess.Popen(["yes"], stdout=subprocess.PIPE) as yes:
        try:
            r = subprocess.run([PY, "-m", "vhubd", "run", "--control", local.control, "demo", "--", "head", "-c",
                                "6"], stdin=yes.stdout, capture_output=True, timeout=60, cwd=ROOT)
        finally:
            yes.kill()
    assert (r.returncode, r.stdout) == (0, b"y\ny\ny\n")


def test_no_stdin_flag_and_a_stdin_that_never_ends(local):
    # -n: the command reads /dev/null even though our stdin is a pipe nobody closes
    with subprocess.Popen([PY, "-m", "vhubd", "run", "--control", local.control, "-n", "demo", "--", "cat"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT) as p:
        try:
            assert p.wait(timeout=60) == 0
            assert p.stdout.read() == b""
        finally:
            p.kill()
    # without -n, a command that does not read stdin still ends blink run with it
    with subprocess.Popen([PY, "-m", "vhubd", "run", "--control", local.control, "demo", "--", "echo", "done"],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT) as p:
        try:
            assert p.wait(timeout=60) == 0
            assert p.stdout.read() == b"done\n"
        finally:
            p.kill()


def test_exit_codes_like_a_shell(local, tmp_path):
    r = run(local, "demo", "--", "no-such-program-x")
    assert (r.returncode, r.stdout) == (127, b"")
    assert r.stderr == b"blink run: no-such-program-x: command not found\n"
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    r = run(local, "demo", "--", str(script))
    assert r.returncode == 126 and r.stderr.decode().startswith(f"blink run: {script}: cannot execute")
    r = run(local, "demo", "--", str(tmp_path))  # a directory
    assert r.returncode == 126, r.stderr
    r = run(local, "--cwd", str(tmp_path / "missing"), "demo", "--", "true")
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and b"cannot start true" in r.stderr
    r = run(local, "demo", "--", "sh", "-c", "exit 42")
    assert r.returncode == 42
    r = run(local, "demo", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


@pytest.mark.parametrize("args", [["demo", "-e", "X=1", "--", "true"], ["demo", "--cwd", "/", "true"],
                                  ["fresh-name", "-t", "--", "true"]])
def test_a_flag_after_name_is_a_usage_error(local, args):
    before = {s["name"] for s in local.call("vhub.sessions")}
    r = run(local, *args)
    assert r.returncode == 2 and r.stdout == b""
    [line] = r.stderr.decode().splitlines()
    assert line.startswith("blink run: error: options go before NAME") and repr(args[1]) in line
    assert {s["name"] for s in local.call("vhub.sessions")} == before  # nothing created


def test_tty_without_a_terminal_falls_back_to_pipes(local):
    with open(os.devnull, "rb") as null:
        r = subprocess.run([PY, "-m", "vhubd", "run", "--control", local.control, "-t", "demo", "--", "sh", "-c",
                            "echo out; echo err >&2; test -t 0 || echo not-a-tty; exit 5"], stdin=null,
                           capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 5
    assert r.stdout == b"out\nnot-a-tty\n"
    lines = r.stderr.decode().splitlines()
    assert lines[0] == ("blink run: stdin is not a terminal, so no terminal for the command: running it on "
                        "pipes (-T)")
    assert lines[1:] == ["err"]


def test_stdin_read_after_the_loop_ended_is_dropped_without_a_warning():
    """The stdin thread may read after ``blink run``'s loop has ended (the command
    was done first): it stops quietly, with no coroutine left un-awaited (CI saw
    "coroutine 'Queue.put' was never awaited" on stderr)."""
    code = textwrap.dedent("""
        import asyncio, os, time, warnings
        warnings.simplefilter("always")
        from vhubd.piperun import StdinPump
        r, w = os.pipe()
        async def main():
            pump = StdinPump(None, 1, 1 << 16, fd=r)
            pump.start()
            await asyncio.sleep(0.05)
            pump.stop()
        asyncio.run(main())
        for _ in range(8):  # more than the queue holds: every read after the loop must go nowhere
            os.write(w, b"late")
            time.sleep(0.05)
        os.close(w)
        time.sleep(0.3)
        print("done")
    """)
    r = subprocess.run([PY, "-X", "dev", "-c", code], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == b"done\n", r.stderr
    assert r.stderr == b""


def test_agent_stdin_feed_is_bounded_against_a_host_ignoring_the_window():
    """The agent holds at most MAX_PENDING bytes for a pipe nobody reads: the rest is
    dropped and counted, EOF still closes the pipe, and what went in comes out whole."""
    from blink_agent.stdin import MAX_PENDING, WINDOW, StdinFeed

    async def main():
        proc = await asyncio.create_subprocess_exec("sh", "-c", "sleep 0.5; cat", stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        reports = []

        async def notify(method, params):
            reports.append((method, dict(params)))

        feed = StdinFeed(7, proc.stdin, notify)
        task = asyncio.ensure_future(feed.run())
        chunk = b"x" * 65536
        for _ in range((4 * MAX_PENDING) // len(chunk)):
            feed.put(chunk)
            assert feed.pending_bytes <= MAX_PENDING
        feed.put(b"")
        feed.put(b"after EOF is ignored")
        out = await asyncio.wait_for(proc.stdout.read(), 30)
        await asyncio.wait_for(task, 30)
        await proc.wait()
        return feed, reports, out

    feed, reports, out = asyncio.run(main())
    assert len(out) == feed.consumed and feed.consumed + feed.dropped == 4 * MAX_PENDING
    assert MAX_PENDING - 65536 <= feed.consumed <= MAX_PENDING + 65536 and feed.dropped > 0
    assert WINDOW < MAX_PENDING
    assert reports and all(m == "agent.stdin" and p["execution_id"] == 7 for m, p in reports)
    assert reports[-1][1]["consumed"] == feed.consumed


def test_agent_refuses_stdin_stream_with_a_terminal_or_inline_stdin(local):
    import json

    assert run(local, "demo", "--", "true").returncode == 0
    for params in ({"argv": ["cat"], "stdin_stream": True, "tty": True},
                   {"argv": ["cat"], "stdin_stream": True, "stdin": "x"},
                   {"argv": ["cat"], "stdin_stream": "yes"}):
        r = subprocess.run([PY, "-m", "vhubd", "call", "--control", local.control, "demo", "agent.run",
                            json.dumps(params)], capture_output=True, timeout=60, cwd=ROOT)
        assert r.returncode == 1 and r.stderr.startswith(b"blink: bad_params: "), r.stderr
