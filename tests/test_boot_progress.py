"""Boot progress: the boot manager's phases go out as ``{"type": "boot"}``
events, and ``blink boot`` / ``run`` / ``call --boot`` show them: a redrawn line
on a terminal, one line at start and one at end on a pipe, nothing when no boot
happens. Real daemon, real agents (local backend), a real pseudo-terminal."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest
from harness import ROOT, client, run

PY = sys.executable
SLOW_AGENT = f"sh -c 'sleep 1; exec {PY} -m blink_agent serve'"


def blink(d, *args: str, **kw) -> subprocess.CompletedProcess:
    sub, rest = args[0], args[1:]
    return subprocess.run([PY, "-m", "vhubd", sub, "--control", d.control, *rest], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, **kw)


def boot_events(d, session: str, boot_params: dict | None = None) -> list[dict]:
    async def body():
        watcher = await client(d, subscribe=["events"])
        try:
            await watcher.call("vhub.boot", {"session": session, **(boot_params or {})}, timeout=60)
        except Exception as exc:  # a failed boot: its events still came
            assert "boot_failed" in str(getattr(exc, "code", "")) or "failed" in str(exc)
        items = watcher.drain()
        return [i.data for i in items if hasattr(i, "data") and isinstance(i.data, dict)
                and i.data.get("type") == "boot"]

    return run(body())


def test_boot_phases_are_events(make_daemon):
    d = make_daemon("--backend", "local")
    evs = boot_events(d, "p1")
    phases = [e["phase"] for e in evs]
    assert phases == ["starting", "starting the agent process", "waiting for the agent to connect", "ready"]
    assert all(e["session"] == "p1" and e["backend"] == "local" for e in evs)
    elapsed = [e["elapsed"] for e in evs]
    assert elapsed == sorted(elapsed) and all(isinstance(x, float) and x >= 0 for x in elapsed)
    assert boot_events(d, "p1") == []  # its agent is connected: no boot, no events


def test_a_failed_boot_ends_with_a_failed_phase(make_daemon):
    d = make_daemon("--backend", "local", "--agent-command", "false")
    evs = boot_events(d, "p2")
    assert [e["phase"] for e in evs][-1] == "failed"
    assert "exited with code 1" in evs[-1]["reason"]


def test_on_a_pipe_one_line_at_start_and_one_at_end(make_daemon):
    d = make_daemon("--backend", "local")
    r = blink(d, "boot", "pipe1")
    assert r.returncode == 0 and r.stdout.startswith("pipe1: ready (booted in ")
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0] == "blink: booting session pipe1 (local)"
    assert lines[1].startswith("blink: session pipe1 booted in ") and lines[1].endswith(" s (local)")
    r = blink(d, "boot", "pipe1")  # up already: nothing to show
    assert (r.returncode, r.stderr) == (0, "") and r.stdout == "pipe1: ready\n"
    r = blink(d, "run", "pipe2", "--", "echo", "hi")
    assert r.returncode == 0 and r.stdout == "hi\n"
    assert [line.split(" in ")[0] for line in r.stderr.splitlines()] == [
        "blink: booting session pipe2 (local)", "blink: session pipe2 booted"]
    r = blink(d, "call", "--boot", "pipe3", "agent.ping")
    assert r.returncode == 0 and '"pong": true' in r.stdout and len(r.stderr.splitlines()) == 2
    r = blink(d, "call", "pipe3", "agent.ping")
    assert (r.returncode, r.stderr) == (0, "")


def test_a_failed_boot_on_a_pipe_says_why_once(make_daemon):
    d = make_daemon("--backend", "local", "--agent-command", "false")
    r = blink(d, "run", "bad", "--", "true")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == "blink: booting session bad (local)"
    assert len(lines) == 2 and lines[1].startswith("blink: boot_failed: ") and "exited with code 1" in lines[1]


def test_on_a_terminal_a_progress_line_then_erased(make_daemon):
    d = make_daemon("--backend", "local", "--agent-command", SLOW_AGENT)
    master, slave = os.openpty()
    try:
        p = subprocess.Popen([PY, "-m", "vhubd", "boot", "--control", d.control, "tty1"], stdout=subprocess.PIPE,
                             stderr=slave, cwd=ROOT)
        os.close(slave)
        seen = b""
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out = p.stdout.read()
        p.stdout.close()
        assert p.wait(timeout=60) == 0
    finally:
        os.close(master)
    assert out.startswith(b"tty1: ready (booted in ")
    text = seen.decode()
    assert "\r\x1b[Kbooting tty1 (local): waiting for the agent to connect … " in text, text
    assert text.endswith("\r\x1b[K")  # erased at the end: the terminal is clean
    assert "\n" not in text


@pytest.mark.parametrize("phase", ["starting", "ready", "failed"])
def test_report_ignores_other_sessions(phase):
    import io

    from vhubd.progress import BootReport

    out = io.StringIO()
    report = BootReport("mine", out)
    report.event({"type": "boot", "session": "other", "phase": phase, "elapsed": 0.5, "backend": "local"})
    report.event({"type": "state", "session": "mine", "state": "ready"})
    assert out.getvalue() == "" and not report.started
