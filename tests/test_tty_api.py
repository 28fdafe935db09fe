"""Terminals for programs (``vhubd.client.open_terminal``) against a real daemon
(local backend) and the real agent: input, resize, output, exit status, several
viewers and one writer, parameter errors, early output, the end of a terminal
whose background job keeps it open. Every wait is bounded."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from harness import Daemon

from vhubd.client import Client, Terminal, open_terminal
from vhubd.errors import InvalidState, RemoteError

PS1 = {"PS1": "api> "}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("ttyapi")
    d = Daemon(base, "--backend", "local", "--state-dir", str(base / "state"), "--boot-timeout", "20").start()
    yield d
    d.stop()


class Screen:
    """What one terminal (or viewer) has shown so far."""

    def __init__(self, term: Terminal):
        self.term = term
        self.data = b""

    async def until(self, pattern: bytes, timeout: float = 10.0) -> bytes:
        async def read() -> None:
            while pattern not in self.data:
                chunk = await self.term.read()
                if not chunk:
                    raise AssertionError(f"terminal ended before {pattern!r}: {self.data[-300:]!r}")
                self.data += chunk

        try:
            await asyncio.wait_for(read(), timeout)
        except TimeoutError:
            raise AssertionError(f"{pattern!r} not shown within {timeout}s: {self.data[-300:]!r}") from None
        head, _, self.data = self.data.partition(pattern)
        return head + pattern

    async def rest(self, timeout: float = 10.0) -> bytes:
        async def read() -> None:
            async for chunk in self.term:
                self.data += chunk

        await asyncio.wait_for(read(), timeout)
        return self.data


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 45))


def test_write_resize_read_wait(daemon):
    async def main():
        term = await open_terminal("api-basic", ["sh"], 24, 80, path=daemon.control, env=PS1)
        async with term:
            assert term.execution_id > 0 and term.pid > 0
            s = Screen(term)
            await s.until(b"api> ")
            await term.write(b"echo $((6*7)); stty size\r")
            assert b"\r\n42\r\n24 80\r\n" in await s.until(b"api> ")
            await term.resize(33, 111)
            await term.write(b"stty size\r")
            assert b"33 111\r\n" in await s.until(b"api> ")
            await term.write(b"exit 4\r")
            await s.rest()
            assert await term.wait(5) == 4
            assert term.result["tty"] is True and term.result["stdout_bytes"] > 0

        term = await open_terminal("api-basic", ["sleep", "30"], path=daemon.control)
        async with term:
            await term.kill("SIGKILL")
            assert await term.wait(10) == -signal.SIGKILL

    run(main())


def test_viewers_see_everything_and_only_one_writes(daemon):
    async def main():
        writer = await open_terminal("api-share", ["sh"], path=daemon.control, env=PS1)
        w = Screen(writer)
        await w.until(b"api> ")
        eid = writer.execution_id
        viewer_client = await Client.connect(daemon.control, session="api-share", subscribe=["stream", "events"])
        lossy_client = await Client.connect(daemon.control, session="api-share", subscribe=["stream"],
                                            flow="lossy")
        v = Screen(viewer_client.watch_terminal(eid))
        lossy = Screen(lossy_client.watch_terminal(eid))
        try:
            await writer.write(b"echo from-writer-$((1+1))\r")
            for screen in (w, v, lossy):
                await screen.until(b"from-writer-2\r\n")
            # a viewer's keys are dropped by the daemon
            await v.term.write(b"echo from-viewer-$((2+2))\r")
            await writer.write(b"echo marker-$((3+3))\r")
            for screen in (w, v):
                assert b"from-viewer" not in await screen.until(b"marker-6\r\n")
            # a late viewer gets the scrollback first
            late_client = await Client.connect(daemon.control, session="api-share", subscribe=["stream"],
                                               replay=True)
            await late_client.call("vhub.ping")  # the replay is written before this answer
            late = Screen(late_client.watch_terminal(eid))
            assert b"from-writer-2\r\n" in await late.until(b"marker-6\r\n")
            await late_client.close()
            stats = await viewer_client.stats()
            assert stats["counters"]["tty_input_dropped"] >= 1
            # an explicit takeover moves the seat
            await v.term.take_over()
            await v.term.write(b"echo took-$((4+4))\r")
            await w.until(b"took-8\r\n")
            await writer.write(b"echo old-writer-$((5+5))\r")
            await v.term.write(b"echo marker-$((6+6))\r")
            assert b"old-writer" not in await w.until(b"marker-12\r\n")
            # the writer leaves: the next client to type takes the free seat
            await viewer_client.close()
            for _ in range(100):  # until the daemon has seen it go
                if (await lossy_client.info("api-share"))["clients"] == 2:
                    break
                await asyncio.sleep(0.05)
            await writer.write(b"echo back-$((7+7))\r")
            await w.until(b"back-14\r\n")
            with pytest.raises(RemoteError) as exc:
                await lossy_client.call("vhub.takeover", {"execution_id": 999999})
            assert exc.value.code == "no_such_terminal"
            await writer.write(b"exit 3\r")
            assert b"exit" in await w.rest()
            assert await writer.wait(5) == 3
        finally:
            await writer.close()
            await viewer_client.close()
            await lossy_client.close()

    run(main())


def test_bad_parameters_and_spawn_failure(daemon):
    async def main():
        async with await Client.connect(daemon.control, session="api-bad", subscribe=["stream", "events"],
                                        boot=True) as c:
            for params, code in [
                ({"argv": ["sh"], "tty": True, "rows": 0}, "bad_params"),
                ({"argv": ["sh"], "tty": True, "cols": "80"}, "bad_params"),
                ({"argv": ["sh"], "tty": True, "term": ""}, "bad_params"),
                ({"argv": ["sh"], "tty": True, "stdin": "x"}, "bad_params"),
                ({"argv": ["/nonexistent/program"], "tty": True}, "spawn_failed"),
            ]:
                with pytest.raises(RemoteError) as exc:
                    await c.call("agent.run", params)
                assert exc.value.code == code, params
            with pytest.raises(InvalidState):
                async with await Client.connect(daemon.control, session="api-bad") as plain:
                    await plain.open_terminal(["sh"])
            # a malformed TtyResize is ignored; the terminal lives on
            term = await c.open_terminal(["sh"], env=PS1)
            s = Screen(term)
            await s.until(b"api> ")
            await c.resize(term.execution_id, 0, 5)
            await c.send_stream(term.execution_id + 1000, b"nobody\r")  # no such terminal: ignored
            await term.write(b"stty size\r")
            assert b"24 80\r\n" in await s.until(b"api> ")
            await term.write(b"exit\r")
            assert await term.wait(5) == 0

    run(main())


def test_early_output_of_fast_programs_is_not_lost(daemon):
    async def main():
        async with await Client.connect(daemon.control, session="api-fast", subscribe=["stream", "events"],
                                        boot=True) as c:
            for i in range(10):
                term = await c.open_terminal(["printf", f"early-{i}"])
                assert await Screen(term).rest() == f"early-{i}".encode()
                assert await term.wait(5) == 0

    run(main())


def test_background_job_holding_the_terminal_does_not_hold_the_result(daemon):
    async def main():
        term = await open_terminal("api-bg", ["sh", "-c", '(trap "" HUP; exec sleep 20) & echo bg=$!'],
                                   path=daemon.control)
        async with term:
            out = await Screen(term).rest(8)
            assert await term.wait(1) == 0
        pid = int(out.split(b"bg=")[1].split()[0])
        os.kill(pid, signal.SIGKILL)

    run(main())
