"""The ``blink`` command: ``serve`` (the daemon) and the client commands.

Tables for people, ``--json`` for programs; errors are one line on stderr
with a non-zero exit (1 for a failed operation, 2 for bad usage, 69 when the
daemon cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from . import __version__, frames
from .errors import ConnectionClosed, RemoteError

EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 69


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("ib")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def _mode(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None


def build_parser() -> Parser:
    p = Parser(prog="blink", description="V-Hub: host-side BLIN channel for sandboxed agents")
    p.add_argument("--version", action="version", version=f"vhubd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--socket", default="/tmp/blink-vhub.sock",
                   help="guest-facing Unix socket (where the VMM maps guest vsock port 10000)")
    s.add_argument("--control", default=None, help="control socket for host clients")
    s.add_argument("--tcp", metavar="HOST:PORT", help="guest-facing loopback TCP listener (token required)")
    s.add_argument("--vsock-port", type=int, metavar="N", help="AF_VSOCK guest listener port")
    s.add_argument("--socket-mode", type=_mode, help="mode of the guest socket (octal)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--anonymous-session", default="default", metavar="NAME",
                   help="session for agents that send an empty handshake (default: default)")
    g.add_argument("--no-anonymous", action="store_true", help="refuse agents without a session")
    s.add_argument("--max-payload", type=_size, default=frames.DEFAULT_MAX_PAYLOAD)
    s.add_argument("--handshake-timeout", type=_positive, default=10.0)
    s.add_argument("--stall-timeout", type=_positive, default=10.0)
    s.add_argument("--heartbeat", type=float, default=10.0, help="heartbeat interval in seconds (0: off)")
    s.add_argument("--rpc-timeout", type=_positive, default=30.0)
    s.add_argument("--max-connections", type=int, default=10000)
    s.add_argument("--scrollback", type=_size, default=1 << 20)
    s.add_argument("--lossy-limit", type=_size, default=4 << 20)
    s.add_argument("--multiple-agents", action="store_true", help="allow several agents per session")
    s.add_argument("--backend", default="auto", choices=["auto", "boxlite", "qemu", "local", "external"],
                   help="how sessions boot (auto: boxlite where VMs can boot, else external)")
    s.add_argument("--state-dir", help="per-daemon state (BoxLite home, session dirs)")
    s.add_argument("--boot-timeout", type=_positive, default=120.0)
    s.add_argument("--idle-stop", type=_positive, metavar="SECONDS",
                   help="stop booted sessions with no clients and no agent traffic for this long")
    s.add_argument("--image", help="BoxLite image: OCI reference or local OCI layout directory; qemu: a guest "
                                   "image directory (default: the one `blink build-guest` made)")
    s.add_argument("--qemu-accel", default="auto", choices=["auto", "kvm", "tcg"],
                   help="qemu backend: auto = KVM when a probe VM runs on it, else TCG")
    s.add_argument("--agent-command", help="local backend: command that runs the guest agent")
    s.add_argument("--once", action="store_true", help="Blink one-shot mode: one agent, first RPC, exit")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument("--log", default="auto", choices=["auto", "journal", "stderr"],
                   help="journal: structured journald entries (needs systemd-python); auto: journal when "
                        "stderr is systemd's journal stream (JOURNAL_STREAM), else stderr")

    def client(name: str, help: str, session: bool = True) -> Parser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--control", default=None, help="daemon control socket (env BLINK_CONTROL)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--timeout", type=_positive, default=None)
        if session:
            c.add_argument("name", metavar="NAME")
        return c

    client("sessions", "list sessions", session=False)
    client("info", "show one session (or the daemon without NAME)", session=False).add_argument(
        "name", nargs="?", metavar="NAME")
    client("stats", "daemon counters", session=False)
    client("register", "pre-register an external session and print its token")
    b = client("boot", "boot a session (if no agent of it is connected)")
    b.add_argument("--image")
    b.add_argument("--cpus", type=int)
    b.add_argument("--memory-mib", type=int)
    client("stop", "stop a session")
    iu = sub.add_parser("install-units", help="install the systemd units (socket activation, Type=notify)")
    iu.add_argument("--prefix", default="/", metavar="DIR",
                    help="install under DIR/etc/systemd/system, DIR/etc/sysusers.d, DIR/etc/tmpfiles.d (default /)")
    iu.add_argument("--variant", default="external", choices=["external", "local", "boxlite"],
                    help="which backend the service runs (adds that backend's drop-in; default external)")
    im = sub.add_parser("build-image", help="build a local OCI layout with the guest agent baked in")
    im.add_argument("out", metavar="DIR")
    im.add_argument("--base", metavar="LAYOUT", help="local OCI layout to build on (one with python3)")
    from .guest import add_arguments as _guest_args

    _guest_args(sub.add_parser("build-guest", help="build the qemu backend's guest kernel + initramfs from "
                                                   "Debian packages (cached in the state dir)"))
    t = client("tail", "print a session's output")
    t.add_argument("-f", "--follow", action="store_true")
    t.add_argument("--no-replay", action="store_true")
    c = client("call", "call a method on a session's agent (or a vhub.* daemon call)")
    c.add_argument("method")
    c.add_argument("params", nargs="?", default=None, help="JSON params")
    r = client("run", "run a command in a session and relay its output")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    r.add_argument("--cwd")
    r.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    tt = r.add_mutually_exclusive_group()
    tt.add_argument("-t", "--tty", action="store_true", default=None,
                    help="run CMD on a terminal, this one in raw mode (default when stdin and stdout "
                         "are terminals)")
    tt.add_argument("-T", "--no-tty", dest="tty", action="store_false", help="plain pipes, even on a terminal")
    r.add_argument("--escape", default="^]", metavar="CHAR",
                   help="with -t: detach key, ^X or a character, 'none' to disable (default ^], Ctrl-])")
    r.formatter_class = argparse.RawDescriptionHelpFormatter
    r.description = "Run CMD in session NAME (booted on demand) and exit with its exit code."
    r.epilog = ("With -t the command gets a terminal of the local window's size: keys (Ctrl-C too) go to\n"
                "it, resizes follow. Ctrl-] (--escape) detaches: the local terminal is restored,\n"
                "blink exits 0, the command keeps running in the session.")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "install-units":
        return cmd_install_units(args)
    if args.command == "build-guest":
        from .guest import run as build_guest

        return build_guest(args)
    if args.command == "build-image":
        from .backends.image import build_agent_layout

        try:
            out = build_agent_layout(args.out, base=args.base)
        except (OSError, KeyError, ValueError) as exc:
            sys.stderr.write(f"blink build-image: error: {exc}\n")
            return EXIT_FAIL
        sys.stdout.write(f"{out}\n")
        return 0
    try:
        return asyncio.run(CLIENT_COMMANDS[args.command](args))
    except ConnectionClosed as exc:
        sys.stderr.write(f"blink: {exc.message}\n")
        return EXIT_UNREACHABLE if exc.code == "unreachable" else EXIT_FAIL
    except RemoteError as exc:
        sys.stderr.write(f"blink: {exc.code}: {exc.message}\n")
        return EXIT_FAIL
    except (asyncio.TimeoutError, TimeoutError):
        sys.stderr.write("blink: timed out\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str, mode: str = "auto") -> None:
    from .systemd import configure_logging

    configure_logging(mode, level)


def cmd_install_units(args) -> int:
    import os

    from .systemd import install_units

    try:
        written = install_units(args.prefix, args.variant)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"blink install-units: error: {exc}\n")
        return EXIT_FAIL
    for path in written:
        sys.stdout.write(f"{path}\n")
    if os.path.realpath(args.prefix) == "/":
        sys.stderr.write("next: systemd-sysusers; systemd-tmpfiles --create; systemctl daemon-reload; "
                         "systemctl enable --now blink-vhub.socket blink-vhub-control.socket\n")
    return 0


def cmd_serve(args) -> int:
    from .daemon import DaemonConfig, serve
    from .server import ListenError, parse_tcp, vsock_address
    from .systemd import ActivationError

    try:
        setup_logging(args.log_level, args.log)
    except ImportError:
        sys.stderr.write("blink serve: error: --log journal needs systemd-python (pip install 'vhubd[systemd]')\n")
        return EXIT_USAGE
    try:
        if args.tcp:
            parse_tcp(args.tcp)
        if args.vsock_port is not None:
            vsock_address(args.vsock_port)
    except ValueError as exc:
        sys.stderr.write(f"blink serve: error: {exc}\n")
        return EXIT_USAGE
    if args.max_payload > frames.MAX_U32 or args.max_payload < 0:
        sys.stderr.write("blink serve: error: --max-payload must fit in 32 bits\n")
        return EXIT_USAGE
    cfg = DaemonConfig(
        socket=args.socket, control=args.control, tcp=args.tcp, vsock_port=args.vsock_port,
        socket_mode=args.socket_mode, anonymous_session=None if args.no_anonymous else args.anonymous_session,
        max_payload=args.max_payload, handshake_timeout=args.handshake_timeout,
        stall_timeout=args.stall_timeout, heartbeat_interval=args.heartbeat, dead_after=3 * args.heartbeat,
        rpc_timeout=args.rpc_timeout, max_connections=args.max_connections, scrollback=args.scrollback,
        lossy_limit=args.lossy_limit, allow_multiple_agents=args.multiple_agents, once=args.once,
        backend=args.backend, state_dir=args.state_dir, boot_timeout=args.boot_timeout,
        idle_stop=args.idle_stop, image=args.image, agent_command=args.agent_command, qemu_accel=args.qemu_accel,
    )
    try:
        return serve(cfg)
    except (ListenError, ActivationError) as exc:
        sys.stderr.write(f"blink serve: error: {exc}\n")
        return EXIT_FAIL
    except Exception as exc:
        from .daemon import BackendStartError, OnceError

        if isinstance(exc, (OnceError, OSError, BackendStartError)):
            sys.stderr.write(f"blink serve: error: {exc}\n")
            return EXIT_FAIL
        raise


# --- client commands ----------------------------------------------------------------

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
    rows = [["NAME", "STATE", "BACKEND", "AGENT", "CLIENTS", "REASON"]]
    for s in sessions:
        rows.append([s["name"], s["state"], s["backend"], "yes" if s["agent_connected"] else "no",
                     str(s["clients"]), s.get("reason", "")])
    _table(rows)
    return 0


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
    async with await _connect(args) as c:
        res = await c.boot(args.name, timeout=args.timeout, **params)
    if args.json:
        _print_json(res)
    else:
        sys.stdout.write(f"{res['session']}: {res['state']}"
                         + (f" (booted in {res['boot_ms']:.0f} ms)" if res.get("booted") else "") + "\n")
    return 0


async def cmd_stop(args) -> int:
    async with await _connect(args) as c:
        res = await c.stop(args.name)
    if args.json:
        _print_json(res)
    else:
        sys.stdout.write(f"{res['session']}: {res['state']}\n")
    return 0


async def cmd_call(args) -> int:
    try:
        params = json.loads(args.params) if args.params is not None else {}
    except json.JSONDecodeError as exc:
        sys.stderr.write(f"blink call: error: params are not JSON: {exc}\n")
        return EXIT_USAGE
    async with await _connect(args, session=args.name) as c:
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
    use_tty = args.tty if args.tty is not None else sys.stdin.isatty() and sys.stdout.isatty()
    if use_tty:
        from .terminal import parse_escape, run_tty

        try:
            escape = parse_escape(args.escape)
        except ValueError as exc:
            sys.stderr.write(f"blink run: error: --escape: {exc}\n")
            return EXIT_USAGE
        return await run_tty(args.control, args.name, argv, env=env or None, cwd=args.cwd, escape=escape,
                             timeout=args.timeout)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    c = await _connect(args, session=args.name, subscribe=["stdout", "stderr", "events"], boot=True,
                       timeout=args.timeout or 10.0)
    try:
        call = asyncio.ensure_future(c.call("agent.run", params, timeout=args.timeout or 60.0))
        eid = None
        early: list = []
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupted.set)
        while True:
            get = asyncio.ensure_future(c.next())
            waits = {get} | ({call} if eid is None else set())
            intr = asyncio.ensure_future(interrupted.wait())
            done, _ = await asyncio.wait(waits | {intr}, return_when=asyncio.FIRST_COMPLETED)
            if intr in done and eid is not None:
                get.cancel()
                try:
                    await c.call("agent.kill", {"execution_id": eid, "signal": 2}, timeout=5)
                except (RemoteError, ConnectionClosed, asyncio.TimeoutError):
                    pass
                interrupted.clear()
                continue
            intr.cancel()
            if call in done and eid is None:
                eid = call.result()["execution_id"]  # raises RemoteError on failure
                for item in early:
                    code = _emit(item, eid, out, err)
                    if code is not None:
                        return code
                early = []
            if get not in done:
                get.cancel()
                continue
            item = get.result()
            if item is None:
                reason = c.closed_reason.message if c.closed_reason else "connection closed"
                sys.stderr.write(f"blink run: lost the daemon before the command finished: {reason}\n")
                return EXIT_FAIL
            if eid is None:
                early.append(item)
                continue
            code = _emit(item, eid, out, err)
            if code is not None:
                return code
    finally:
        await c.close()


def _emit(item, eid: int, out, err) -> int | None:
    if hasattr(item, "kind"):
        if item.request_id == eid:
            stream = err if item.kind == "stderr" else out
            stream.write(item.data)
            stream.flush()
        return None
    ev = item.data
    if ev.get("type") == "execution_result" and ev.get("execution_id") == eid:
        code = ev.get("exit_code")
        if not isinstance(code, int):
            return EXIT_FAIL
        return code if code >= 0 else 128 + (-code)
    if ev.get("type") == "state" and ev.get("state") in ("agent_lost", "stopped", "failed"):
        sys.stderr.write(f"blink run: session {ev.get('session')} is {ev.get('state')}: {ev.get('reason', '')}\n")
        return EXIT_FAIL
    return None


CLIENT_COMMANDS = {
    "sessions": cmd_sessions, "info": cmd_info, "stats": cmd_stats, "register": cmd_register,
    "call": cmd_call, "tail": cmd_tail, "run": cmd_run, "boot": cmd_boot, "stop": cmd_stop,
}


if __name__ == "__main__":
    sys.exit(main())
