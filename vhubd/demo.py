"""The README's main job: one session end to end, on any host.

Starts ``blink serve`` with the embedded default that needs no KVM (the
``local`` backend: the guest agent as a host process, NOT a sandbox), then, as
a host client: boots session ``demo`` on demand, waits for its agent, serves a
host method the guest calls, runs a command in the session with ``agent.run``
and streams its output live, and reports the exit code. Everything goes
through the daemon's real sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .client import Client, Event, Output

GUEST_SCRIPT = r"""
import os, sys, time
import blink_agent
print("hello from session", os.environ["VHUB_SESSION"], "pid", os.getpid(), flush=True)
with blink_agent.connect() as hub:
    answer = hub.call("host.greet", {"from": "guest", "pid": os.getpid()})
print("host.greet answered:", answer, flush=True)
for i in range(3):
    print(f"tick {i}", flush=True)
    time.sleep(0.1)
print("a line on stderr", file=sys.stderr, flush=True)
sys.exit(7)
"""


def say(msg: str) -> None:
    sys.stderr.write(f"demo: {msg}\n")
    sys.stderr.flush()


async def drive(control: str) -> int:
    greeted: list = []

    def greet(params):
        greeted.append(params)
        return {"greeting": f"hello {params.get('from')}, this is the host", "time": time.time()}

    t0 = time.monotonic()
    say("connecting to session 'demo' with boot=true (no agent yet: the daemon boots it)")
    c = await Client.connect(control, session="demo", subscribe=["stdout", "stderr", "events"], boot=True)
    # the session exists now (a client never creates one without boot): serve host.greet in it
    handler = await Client.connect(control, session="demo", serve={"host.greet": greet})
    say(f"session booted and its agent connected in {(time.monotonic() - t0) * 1000:.0f} ms: "
        f"state={c.hello['session']['state']} backend={c.hello['session']['backend']}")
    info = await c.call("agent.info")
    say(f"agent.info RPC -> pid={info.get('pid')} python={info.get('python')}")
    res = await c.call("agent.run", {"argv": [sys.executable, "-c", GUEST_SCRIPT]})
    eid = res["execution_id"]
    say(f"agent.run started execution {eid}; streaming its output:")
    code = None
    partial = {"stdout": b"", "stderr": b""}
    while code is None:
        item = await c.next(timeout=60)
        if item is None:
            say("lost the daemon")
            return 1
        if isinstance(item, Output) and item.request_id == eid:
            *lines, partial[item.kind] = (partial[item.kind] + item.data).split(b"\n")
            for line in lines:
                print(f"  [{item.kind}] {line.decode(errors='replace')}", flush=True)
        elif isinstance(item, Event) and item.data.get("type") == "execution_result":
            if item.data.get("execution_id") == eid:
                code = item.data.get("exit_code")
    say(f"execution {eid} exited with code {code}; the host served {len(greeted)} guest RPC(s): {greeted}")
    sessions = await c.sessions()
    for s in sessions:
        say(f"session {s['name']}: state={s['state']} backend={s['backend']} agent={s['agent_connected']}")
    await c.close()
    await handler.close()
    ok = code == 7 and len(greeted) == 1
    say("end to end OK" if ok else "end to end FAILED")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vhubd.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon log, agent log)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="vhub-demo-")
    guest, control = os.path.join(tmp, "guest.sock"), os.path.join(tmp, "control.sock")
    log_path = os.path.join(tmp, "vhubd.log")
    say(f"starting blink serve --backend local (agents run as host processes: NOT a sandbox) in {tmp}")
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "vhubd", "serve", "--socket", guest, "--control", control,
                                   "--backend", "local", "--state-dir", os.path.join(tmp, "state")],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(control):
            if daemon.poll() is not None or time.monotonic() > deadline:
                say("the daemon did not start:\n" + open(log_path).read())
                return 1
            time.sleep(0.05)
        code = asyncio.run(drive(control))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
        say(f"daemon stopped (exit {daemon.returncode}); its log: {log_path if args.keep else '(removed)'}")
        if code_is_failure := (daemon.returncode not in (0, None)):
            say(open(log_path).read())
        if not args.keep and not code_is_failure:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
