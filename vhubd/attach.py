"""``blink attach SESSION EXECUTION``: back to an execution that is running.

A terminal execution (``agent.run`` with ``tty``, e.g. one detached from with
Ctrl-]): its scrollback (the session's replay, filtered by execution id), then
this terminal in raw mode relayed to it as ``blink run -t`` does, with the
writer seat taken over (``vhub.takeover``), the window size sent, the detach key.
Without a terminal on our stdin it is only watched.

A pipe execution: its stdout and stderr from the scrollback on, live until it
ends; Ctrl-C detaches (it keeps running). Either way ``blink attach`` exits with
the execution's exit status. An execution that is not running any more: what the
scrollback still has of it, and one line saying so (exit 1, or its exit status
when the session's last result is that execution's).
"""

from __future__ import annotations

import sys

from .client import Client, Event, Output
from .errors import RemoteError
from .piperun import EXIT_FAIL, exit_status, relay_execution

NAME = "blink attach"


async def _probe(control: str | None, session: str, eid: int, timeout: float) -> tuple[bool, bool, dict]:
    """(is a terminal, is running, the session's info) without taking anything."""
    async with await Client.connect(control, session=session, timeout=timeout) as probe:
        info = await probe.info(session)
        try:
            await probe.call("vhub.takeover", {"execution_id": eid}, timeout=timeout)
            tty = True
        except RemoteError as exc:
            if exc.code != "no_such_terminal":
                raise
            tty = False
        running = False
        if info.get("agent_connected"):
            agent = await probe.call("agent.info", {}, timeout=timeout)
            running = isinstance(agent, dict) and eid in (agent.get("executions") or [])
    return tty, running, info


async def attach(control: str | None, session: str, eid: int, *, escape: int | None,
                 timeout: float | None = None) -> int:
    t = timeout or 10.0
    tty, running, info = await _probe(control, session, eid, t)
    if tty and running:
        from .terminal import relay_terminal

        client = await Client.connect(control, session=session, subscribe=["stream", "events"], replay=True,
                                      timeout=t)
        try:
            term = client.watch_terminal(eid)  # the scrollback queued so far goes to it first
            client._route_only = True  # output of other executions is not ours to keep
            if sys.stdin.isatty():
                await term.take_over()
            else:
                sys.stderr.write(f"{NAME}: stdin is not a terminal: watching execution {eid} only\n")
                escape = None
            return await relay_terminal(client, term, session, escape, name=NAME)
        finally:
            await client.close()
    client = await Client.connect(control, session=session, subscribe=["stdout", "stderr", "stream", "events"],
                                  replay=True, timeout=t)
    try:
        if running:
            return await relay_execution(client, eid, name=NAME, detach_on_interrupt=True)
        await client.call("vhub.ping", timeout=t)  # the replay is written before this answer
        return _finished(client, eid, info)
    finally:
        await client.close()


def _finished(client: Client, eid: int, info: dict) -> int:
    """Print what the scrollback has of a finished execution; its status if known."""
    out, err = sys.stdout.buffer, sys.stderr.buffer
    result = None
    for item in client.drain():
        if type(item) is Output and item.request_id == eid:
            (err if item.kind == "stderr" else out).write(item.data)
        elif type(item) is Event and item.data.get("type") == "execution_result" \
                and item.data.get("execution_id") == eid:
            result = item.data
    out.flush()
    last = info.get("last_result")
    if result is None and isinstance(last, dict) and last.get("execution_id") == eid:
        result = last
    if result is not None:
        sys.stderr.write(f"{NAME}: execution {eid} has ended (exit code {result.get('exit_code')})\n")
        return exit_status(result.get("exit_code"))
    sys.stderr.write(f"{NAME}: no running execution {eid} in session {info.get('name')} "
                     "(the scrollback above is what is left of it, if anything)\n")
    return EXIT_FAIL
