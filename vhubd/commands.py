"""The ``blink`` client commands: each connects to the daemon's control
socket with ``vhubd.client`` and prints tables for people or ``--json``."""

from __future__ import annotations

import asyncio
import json
import sys
import time

EXIT_FAIL = 1  # the operation failed
EXIT_USAGE = 2  # bad usage
EXIT_UNREACHABLE = 69  # the daemon cannot be reached (EX_UNAVAILABLE)


async def _connect(args, **kw):
    from .client import Client

    return await Client.connect(args.control, **kw)


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


async def cmd_sessions(args) -> int:
    async with await _connect(args) as c:
        sessions = await c.sessions()
    if args.json:
        _print_json(sessions)
        return 0
    rows = [["NAME", "STATE", "BACKEND", "AGENT", "CLIENTS", "EXPOSED", "REASON"]]
    for s in sessions:
        rows.append([s["name"], s["state"], s["backend"], "yes" if s["agent_connected"] else "no",
                     str(s["clients"]), _exposed(s.get("exposed") or []), s.get("reason", "")])
    _table(rows)
    return 0


def _exposed(exposed: list) -> str:
    """``8000->127.0.0.1:41234,...`` for a table, or ``-``."""
    return ",".join(f"{e['guest_port']}->{e['listen']}" for e in exposed) or "-"


async def cmd_info(args) -> int:
    async with await _connect(args) as c:
        info = await c.info(args.name)
    if args.json or not args.name:
        _print_json(info)
        return 0
    for k in ("name", "state", "reason", "backend", "agent_connected", "clients", "scrollback_bytes"):
        sys.stdout.write(f"{k + ':':18} {info.get(k)}\n")
    if info.get("agent"):
        sys.stdout.write(f"{'agent:':18} {json.dumps(info['agent'])}\n")
    for e in info.get("exposed") or []:
        sys.stdout.write(f"{'exposed:':18} guest port {e['guest_port']} at {e['url']} ({e['connections']} open, "
                         f"{e['accepted']} accepted, {e['refused']} refused"
                         + (f"; last refusal: {e['last_refusal']}" if e.get("last_refusal") else "") + ")\n")
    if info.get("last_result") is not None:
        sys.stdout.write(f"{'last_result:':18} {json.dumps(info['last_result'])}\n")
    if info.get("warning"):
        sys.stdout.write(f"{'warning:':18} {info['warning']}\n")
    return 0


async def cmd_stats(args) -> int:
    async with await _connect(args) as c:
        stats = await c.stats()
    if args.json:
        _print_json(stats)
        return 0
    for k, v in sorted(stats.items()):
        if isinstance(v, dict):
            for k2, v2 in sorted(v.items()):
                sys.stdout.write(f"{k}.{k2}: {v2}\n")
        else:
            sys.stdout.write(f"{k}: {v}\n")
    return 0


async def cmd_register(args) -> int:
    async with await _connect(args) as c:
        res = await c.register(args.name)
    if args.json:
        _print_json(res)
    else:
        sys.stdout.write(f"{res['token']}\n")
    return 0


async def cmd_boot(args) -> int:
    params = {k: v for k, v in (("image", args.image), ("cpus", args.cpus), ("memory_mib", args.memory_mib))
              if v is not None}
    from .progress import boot_with_progress

    res = await boot_with_progress(args.control, args.name, params, timeout=args.timeout)
    if args.json:
        _print_json(res)
    else:
        sys.stdout.write(f"{res['session']}: {res['state']}"
                         + (f" (booted in {res['boot_ms']:.0f} ms)" if res.get("booted") else "") + "\n")
    return 0


async def _on_session(args, call, line) -> int:
    """One daemon call about session NAME: its result as JSON, or ``line(result)``."""
    async with await _connect(args) as c:
        res = await call(c, args.name)
    if args.json:
        _print_json(res)
    else:
        sys.stdout.write(line(res) + "\n")
    return 0


async def cmd_rm(args) -> int:
    return await _on_session(args, lambda c, n: c.remove(n), lambda r: f"{r['session']}: removed")


async def cmd_stop(args) -> int:
    return await _on_session(args, lambda c, n: c.stop(n), lambda r: f"{r['session']}: {r['state']}")


async def cmd_standby(args) -> int:
    return await _on_session(args, lambda c, n: c.standby(n), lambda r: f"{r['session']}: {r['state']}")


async def cmd_wake(args) -> int:
    return await _on_session(args, lambda c, n: c.wake(n), lambda r: f"{r['session']}: {r['state']}" + (
        f" in {r['ms']:.1f} ms" if r.get("woken") else " (it was not in standby)"))


async def cmd_snapshot(args) -> int:
    return await _on_session(args, lambda c, n: c.snapshot(n, args.snapshot, stop=args.stop), lambda r: (
        f"{r['session']}: snapshot {r['snapshot']} saved ({r['size_bytes'] / 1048576:.0f} MiB in "
        f"{r['ms'] / 1000:.1f} s); {r['state']}"))


async def cmd_snapshots(args) -> int:
    async with await _connect(args) as c:
        snaps = await c.snapshots(args.name)
    if args.json:
        _print_json(snaps)
        return 0
    rows = [("SNAPSHOT", "CREATED", "SIZE")] + [
        (s["name"], time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.get("created_at", 0))),
         f"{s.get('size_bytes', 0) / 1048576:.0f} MiB") for s in snaps]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        sys.stdout.write("  ".join(v.ljust(w) for v, w in zip(r, width, strict=True)).rstrip() + "\n")
    return 0


async def cmd_restore(args) -> int:
    return await _on_session(args, lambda c, n: c.restore(n, args.snapshot), lambda r: (
        f"{r['session']}: restored from {r['snapshot']} in {r['boot_ms'] / 1000:.1f} s; {r['state']}"))


async def cmd_rm_snapshot(args) -> int:
    return await _on_session(args, lambda c, n: c.remove_snapshot(n, args.snapshot),
                             lambda r: f"{r['session']}: snapshot {r['snapshot']} removed")


async def cmd_call(args) -> int:
    try:
        params = json.loads(args.params) if args.params is not None else {}
    except json.JSONDecodeError as exc:
        sys.stderr.write(f"blink call: error: params are not JSON: {exc}\n")
        return EXIT_USAGE
    if args.boot:
        from .progress import boot_with_progress

        await boot_with_progress(args.control, args.name, timeout=args.timeout)
    async with await _connect(args, session=args.name, boot=args.boot) as c:
        result = await c.call(args.method, params, timeout=args.timeout or 60.0)
    _print_json(result)
    return 0


async def cmd_tail(args) -> int:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    async with await _connect(args, session=args.name, subscribe=["stdout", "stderr"],
                              replay=not args.no_replay) as c:
        if not args.follow:
            # the daemon writes the replay before it answers this ping
            ping = asyncio.ensure_future(c.call("vhub.ping"))
            while True:
                get = asyncio.ensure_future(c.next())
                done, _ = await asyncio.wait({get, ping}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    item = get.result()
                    if item is None:
                        break
                    (err if item.kind == "stderr" else out).write(item.data)
                    continue
                get.cancel()
                while not c._queue.empty():
                    item = c._queue.get_nowait()
                    if hasattr(item, "kind"):
                        (err if item.kind == "stderr" else out).write(item.data)
                break
            out.flush()
            err.flush()
            return 0
        async for item in c:
            if hasattr(item, "kind"):
                (err if item.kind == "stderr" else out).write(item.data)
                (err if item.kind == "stderr" else out).flush()
    return 0


async def cmd_run(args) -> int:
    if args.argv[:1] != ["--"] and args.argv[:1] and args.argv[0].startswith("-"):
        sys.stderr.write(f"blink run: error: options go before NAME, not after it: {args.argv[0]!r} "
                         "(blink run [OPTIONS] NAME -- CMD ARGS...)\n")
        return EXIT_USAGE
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        sys.stderr.write("blink run: error: no command given (blink run NAME -- CMD ARGS...)\n")
        return EXIT_USAGE
    env = {}
    for kv in args.env:
        k, sep, v = kv.partition("=")
        if not sep:
            sys.stderr.write(f"blink run: error: --env wants K=V, got {kv!r}\n")
            return EXIT_USAGE
        env[k] = v
    params: dict = {"argv": argv}
    if env:
        params["env"] = env
    if args.cwd:
        params["cwd"] = args.cwd
    from .progress import boot_with_progress

    await boot_with_progress(args.control, args.name, timeout=args.timeout)  # shows its progress, if it boots
    use_tty = args.tty if args.tty is not None else sys.stdin.isatty() and sys.stdout.isatty()
    if use_tty and not sys.stdin.isatty():
        sys.stderr.write("blink run: stdin is not a terminal, so no terminal for the command: running it on "
                         "pipes (-T)\n")
        use_tty = False
    if use_tty:
        from .terminal import parse_escape, run_tty

        try:
            escape = parse_escape(args.escape)
        except ValueError as exc:
            sys.stderr.write(f"blink run: error: --escape: {exc}\n")
            return EXIT_USAGE
        return await run_tty(args.control, args.name, argv, env=env or None, cwd=args.cwd, escape=escape,
                             timeout=args.timeout)
    from .piperun import run_pipes

    c = await _connect(args, session=args.name, subscribe=["stdout", "stderr", "events"], boot=True,
                       timeout=args.timeout or 10.0)
    try:
        return await run_pipes(c, params, forward_stdin=not args.no_stdin, timeout=args.timeout)
    finally:
        await c.close()


async def cmd_attach(args) -> int:
    from .attach import attach
    from .terminal import parse_escape

    try:
        escape = parse_escape(args.escape)
    except ValueError as exc:
        sys.stderr.write(f"blink attach: error: --escape: {exc}\n")
        return EXIT_USAGE
    if args.execution <= 0:
        sys.stderr.write(f"blink attach: error: EXECUTION is a positive execution id, not {args.execution}\n")
        return EXIT_USAGE
    return await attach(args.control, args.name, args.execution, escape=escape, timeout=args.timeout)


async def cmd_expose(args) -> int:
    """``blink expose SESSION GUEST_PORT [--listen HOST:PORT] [--wait]`` (``--remove`` undoes it)."""
    import time

    async with await _connect(args) as c:
        if args.remove:
            res = await c.call("vhub.unexpose", {"session": args.name, "port": args.port})
            if args.json:
                _print_json(res)
            else:
                sys.stdout.write(f"{args.name}: guest port {args.port} no longer exposed\n")
            return 0
        res = await c.call("vhub.expose", {"session": args.name, "port": args.port, "listen": args.listen})
        if args.wait:
            deadline = time.monotonic() + (args.timeout or 60.0)
            while True:
                probe = await c.call("agent.probe_port", {"port": args.port}, session=args.name,
                                     timeout=max(1.0, deadline - time.monotonic()) + 5)
                if isinstance(probe, dict) and probe.get("open"):
                    break
                if time.monotonic() >= deadline:
                    why = probe.get("error") if isinstance(probe, dict) else None
                    sys.stderr.write(f"blink expose: guest port {args.port} of {args.name} did not accept within "
                                     f"{args.timeout or 60.0:g} s ({why or 'closed'})\n")
                    return EXIT_FAIL
                await asyncio.sleep(0.2)
    if args.json:
        _print_json(res)
    else:
        sys.stdout.write(f"{res['url']}\n")
    return 0


async def cmd_cp(args) -> int:
    from .filecopy import cmd_cp as run

    return await run(args)


CLIENT_COMMANDS = {
    "expose": cmd_expose, "cp": cmd_cp,
    "sessions": cmd_sessions, "info": cmd_info, "stats": cmd_stats, "register": cmd_register,
    "call": cmd_call, "tail": cmd_tail, "run": cmd_run, "boot": cmd_boot, "stop": cmd_stop, "rm": cmd_rm,
    "attach": cmd_attach, "standby": cmd_standby, "wake": cmd_wake,
    "snapshot": cmd_snapshot, "snapshots": cmd_snapshots, "restore": cmd_restore, "rm-snapshot": cmd_rm_snapshot,
}
