"""The ``blink`` command: ``serve`` (the daemon) and the client commands.

Tables for people, ``--json`` for programs; errors are one line on stderr
with a non-zero exit (1 for a failed operation, 2 for bad usage, 69 when the
daemon cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__, frames
from .commands import EXIT_FAIL, EXIT_UNREACHABLE, EXIT_USAGE
from .errors import ConfigError, ConnectionClosed, RemoteError


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
    s.add_argument("--max-connections", type=int, default=10000, help="guest connections, at most")
    s.add_argument("--max-clients", type=int, default=1024,
                   help="control-socket connections, at most (counted apart from guests)")
    s.add_argument("--max-sessions", type=int, default=10_000, help="sessions the daemon holds, at most")
    s.add_argument("--max-attached", type=int, default=64, help="attached guest connections per session")
    s.add_argument("--max-inflight", type=int, default=1024, help="RPCs one connection may have in flight")
    s.add_argument("--max-output", type=_size, default=32 << 20,
                   help="bytes queued toward one connection, at most (slow_consumer above)")
    s.add_argument("--max-handshake", type=_size, default=64 << 10, help="handshake payload, at most")
    s.add_argument("--guest-dir", metavar="DIR",
                   help="per-session guest sockets DIR/<session>.sock (Firecracker, cloud-hypervisor, libkrun "
                        "map a VM's vsock port to it): the socket names the session, no token")
    s.add_argument("--scrollback", type=_size, default=1 << 20)
    s.add_argument("--lossy-limit", type=_size, default=4 << 20)
    s.add_argument("--multiple-agents", action="store_true", help="allow several agents per session")
    s.add_argument("--backend", default="auto", choices=["auto", "boxlite", "qemu", "local", "external"],
                   help="how sessions boot (auto: boxlite where VMs can boot, else external)")
    s.add_argument("--state-dir", help="per-daemon state (BoxLite home, session dirs)")
    s.add_argument("--boot-timeout", type=_positive, default=120.0)
    s.add_argument("--idle-stop", type=_positive, metavar="SECONDS",
                   help="stop booted sessions with no clients and no agent traffic for this long")
    s.add_argument("--image", help="boxlite: an OCI reference (a registry image) or a local OCI layout directory "
                                   "(default: the layout `blink build-image` builds from Debian packages, built on "
                                   "first use); qemu: a guest image directory (default: `blink build-guest`'s)")
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
    client("rm", "remove a session (stopping it first): its token, scrollback and sockets go")
    iu = sub.add_parser("install-units", help="install the systemd units (socket activation, Type=notify)")
    iu.add_argument("--prefix", default="/", metavar="DIR",
                    help="install under DIR/etc/systemd/system, DIR/etc/sysusers.d, DIR/etc/tmpfiles.d (default /)")
    iu.add_argument("--variant", default="external", choices=["external", "local", "boxlite"],
                    help="which backend the service runs (adds that backend's drop-in; default external)")
    from .guest import oci as _oci

    _oci.add_arguments(sub.add_parser("build-image", help="build BoxLite's default image, an OCI layout from Debian "
                                                         "packages with the guest agent as its entrypoint (cached "
                                                         "in the state dir)"))
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
        from .guest.oci import run as build_image

        return build_image(args)
    try:
        from .commands import CLIENT_COMMANDS

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
    from .journal import configure_logging

    configure_logging(mode, level)


def cmd_install_units(args) -> int:
    import os

    from .units import install_units

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
    from .listeners import ListenError, parse_tcp, vsock_address
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
    cfg = DaemonConfig(
        socket=args.socket, control=args.control, tcp=args.tcp, vsock_port=args.vsock_port,
        socket_mode=args.socket_mode, anonymous_session=None if args.no_anonymous else args.anonymous_session,
        max_payload=args.max_payload, handshake_timeout=args.handshake_timeout,
        stall_timeout=args.stall_timeout, heartbeat_interval=args.heartbeat, dead_after=3 * args.heartbeat,
        rpc_timeout=args.rpc_timeout, max_connections=args.max_connections, scrollback=args.scrollback,
        lossy_limit=args.lossy_limit, allow_multiple_agents=args.multiple_agents, once=args.once,
        backend=args.backend, state_dir=args.state_dir, boot_timeout=args.boot_timeout,
        idle_stop=args.idle_stop, image=args.image, agent_command=args.agent_command, qemu_accel=args.qemu_accel,
        max_clients=args.max_clients, max_sessions=args.max_sessions, max_attached=args.max_attached,
        max_inflight=args.max_inflight, max_output=args.max_output, max_handshake=args.max_handshake,
        guest_dir=args.guest_dir,
    )
    try:
        cfg.validate()
    except ConfigError as exc:
        sys.stderr.write(f"blink serve: error: {exc}\n")
        return EXIT_USAGE
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



if __name__ == "__main__":
    sys.exit(main())
