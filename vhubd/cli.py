"""The ``blink`` command: ``serve`` (the daemon) and the client commands.

Tables for people, ``--json`` for programs; errors are one line on stderr
with a non-zero exit (1 for a failed operation, 2 for bad usage, 69 when the
daemon cannot be reached).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__
from .commands import EXIT_FAIL, EXIT_UNREACHABLE, EXIT_USAGE
from .errors import ConfigError, ConnectionClosed, RemoteError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return v


def build_parser() -> Parser:
    p = Parser(prog="blink", description="V-Hub: host-side BLIN channel for sandboxed agents")
    p.add_argument("--version", action="version", version=f"vhubd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    s = sub.add_parser("serve", help="run the daemon",
                       description="Run the daemon. Settings: defaults, then the TOML config file, then these "
                                   "flags (a flag wins).")
    from .serveconfig import add_serve_arguments

    add_serve_arguments(s)

    def client(name: str, help: str, session: bool = True) -> Parser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--control", default=None, metavar="PATH",
                       help="daemon control socket (default: $BLINK_CONTROL, else $XDG_RUNTIME_DIR/blink/"
                            "control.sock, /run/blink/control.sock for root: where `blink serve` listens)")
        c.add_argument("--json", action="store_true", help="machine-readable output (default: tables)")
        c.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS",
                       help="give up after this long (default: connect 10 s, calls 60 s, boots the daemon's "
                            "--boot-timeout)")
        if session:
            c.add_argument("name", metavar="NAME", help="session name")
        return c

    client("sessions", "list sessions", session=False)
    client("info", "show one session (or the daemon without NAME)", session=False).add_argument(
        "name", nargs="?", metavar="NAME")
    client("stats", "daemon counters", session=False)
    client("register", "pre-register an external session and print its token")
    b = client("boot", "boot a session (if no agent of it is connected)")
    b.add_argument("--image", help="image for this boot (default: the daemon's --image)")
    b.add_argument("--cpus", type=int, help="vCPUs (default: the backend's)")
    b.add_argument("--memory-mib", type=int, help="memory in MiB (default: the backend's)")
    client("stop", "stop a session")
    client("standby", "pause a booted session, keeping its memory (anything sent to it wakes it)")
    client("wake", "resume a session from standby")
    sn = client("snapshot", "save a session's whole sandbox (qemu: memory and devices) as snapshot SNAP")
    sn.add_argument("snapshot", metavar="SNAP", help="snapshot name")
    sn.add_argument("--stop", action="store_true", help="stop the session after the snapshot (scale to zero)")
    client("snapshots", "list a session's snapshots, newest first")
    client("restore", "bring a session back as it was at snapshot SNAP (stopping what runs)").add_argument(
        "snapshot", metavar="SNAP", help="snapshot name")
    client("rm-snapshot", "remove a session's snapshot SNAP").add_argument(
        "snapshot", metavar="SNAP", help="snapshot name")
    client("rm", "remove a session (stopping it first): its token, scrollback and sockets go")
    ht = sub.add_parser("http-token", help="print the HTTP API's bearer token (blink serve --http makes it)")
    ht.add_argument("--state-dir", metavar="DIR", help="the daemon's state dir (default: $BLINK_STATE_DIR, "
                                                       "/var/lib/blink for root, else ~/.local/state/blink)")
    ht.add_argument("--url", metavar="HOST:PORT", help="print the web page's address with the token instead "
                                                       "(e.g. 127.0.0.1:8787)")
    iu = sub.add_parser("install-units", help="install the systemd units (socket activation, Type=notify)")
    iu.add_argument("--prefix", default="/", metavar="DIR",
                    help="install under DIR/etc/systemd/system, DIR/etc/sysusers.d, DIR/etc/tmpfiles.d (default /)")
    iu.add_argument("--variant", default="external", choices=["external", "local", "boxlite", "qemu"],
                    help="which backend the service runs (adds that backend's drop-in; default external)")
    from .guest import oci as _oci

    _oci.add_arguments(sub.add_parser("build-image", help="build BoxLite's default image, an OCI layout from Debian "
                                                         "packages with the guest agent as its entrypoint (cached "
                                                         "in the state dir)"))
    from .guest import add_arguments as _guest_args

    _guest_args(sub.add_parser("build-guest", help="build the qemu backend's guest kernel + initramfs from "
                                                   "Debian packages (cached in the state dir)"))
    t = client("tail", "print a session's output")
    t.add_argument("-f", "--follow", action="store_true", help="keep printing new output (default: print the "
                                                               "scrollback and exit)")
    t.add_argument("--no-replay", action="store_true", help="skip the scrollback (default: print it first)")
    c = client("call", "call a method on a session's agent (or a vhub.* daemon call)")
    c.add_argument("--boot", action="store_true",
                   help="boot the session first if no agent of it is connected (creating it; default: off, an "
                        "unknown session is an error)")
    c.add_argument("method", help="e.g. agent.info, agent.run, vhub.stats")
    c.add_argument("params", nargs="?", default=None, help="JSON params (default: {})")
    x = client("expose", "expose a TCP port of a session on the host (a preview URL)")
    x.add_argument("port", type=int, metavar="GUEST_PORT", help="the port inside the guest (on its 127.0.0.1)")
    x.add_argument("--listen", metavar="HOST:PORT", default=None,
                   help="where the host listens (default 127.0.0.1 and a free port; the URL is printed)")
    x.add_argument("--wait", action="store_true",
                   help="return once the guest port accepts connections (up to --timeout, default 60 s)")
    x.add_argument("--remove", action="store_true", help="stop exposing GUEST_PORT (resets its connections)")
    x.description = ("Listen on the host; every connection is carried over the session's V-Hub channel to "
                     "127.0.0.1:GUEST_PORT in the guest. Exposures last while the session lives "
                     "(blink sessions / blink info list them).")
    cp = sub.add_parser("cp", help="copy files into or out of a session (tar streams, sha256-checked)")
    cp.add_argument("--control", default=None, metavar="PATH", help="daemon control socket")
    cp.add_argument("--json", action="store_true", help="print the result as JSON")
    cp.add_argument("--timeout", type=_positive, default=None, metavar="SECONDS", help="connect timeout")
    cp.add_argument("src", metavar="SRC", help="PATH, SESSION:/path, or - (a tar on stdin)")
    cp.add_argument("dest", metavar="DEST", help="PATH, SESSION:/path, or - (a tar on stdout)")
    cp.description = ("Copy PATH (a file or a tree) into SESSION:/dest, or SESSION:/path out to DEST, as a tar "
                      "stream: modes and mtimes kept (owners too as root), symlinks copied as links, the "
                      "archive's sha256 checked by both ends. A DEST that is a directory receives the source "
                      "under its own name. '-' reads or writes the tar itself.")
    a = client("attach", "re-attach to a running execution (a terminal, or a pipe's output), with its scrollback")
    a.add_argument("execution", type=int, metavar="EXECUTION", help="the execution id (blink run -t prints it "
                                                                    "when you detach)")
    a.add_argument("--escape", default="^]", metavar="CHAR",
                   help="terminal: detach key, ^X or a character, 'none' to disable (default ^], Ctrl-])")
    a.formatter_class = argparse.RawDescriptionHelpFormatter
    a.description = "Re-attach to execution EXECUTION of session NAME and exit with its exit code."
    a.epilog = ("A terminal: its scrollback, then this terminal in raw mode (keys, resizes; Ctrl-] detaches\n"
                "again), taking over the writer seat. A pipe execution: its output from the scrollback on,\n"
                "live; Ctrl-C detaches. It keeps running after a detach either way.")
    r = client("run", "run a command in a session and relay its output")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    r.add_argument("--cwd", help="working directory of CMD in the session (default: the agent's)")
    r.add_argument("-e", "--env", action="append", default=[], metavar="K=V",
                   help="set a variable for CMD (repeatable)")
    r.add_argument("-n", "--no-stdin", action="store_true",
                   help="do not forward stdin: CMD reads /dev/null (pipes only; like ssh -n)")
    tt = r.add_mutually_exclusive_group()
    tt.add_argument("-t", "--tty", action="store_true", default=None,
                    help="run CMD on a terminal, this one in raw mode (default when stdin and stdout "
                         "are terminals)")
    tt.add_argument("-T", "--no-tty", dest="tty", action="store_false", help="plain pipes, even on a terminal")
    r.add_argument("--escape", default="^]", metavar="CHAR",
                   help="with -t: detach key, ^X or a character, 'none' to disable (default ^], Ctrl-])")
    r.formatter_class = argparse.RawDescriptionHelpFormatter
    r.description = ("Run CMD in session NAME (booted on demand) and exit with its exit code (127: not found, "
                     "126: cannot execute, 128+N: killed by signal N). Options go before NAME.")
    r.epilog = ("Without -t, stdin is forwarded to CMD as a stream (EOF included) unless -n.\n"
                "With -t the command gets a terminal of the local window's size: keys (Ctrl-C too) go to\n"
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
    if args.command == "http-token":
        return cmd_http_token(args)
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
    except TimeoutError:
        sys.stderr.write("blink: timed out\n")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str, mode: str = "auto") -> None:
    from .journal import configure_logging

    configure_logging(mode, level)


def cmd_http_token(args) -> int:
    from .api.access import read_token
    from .paths import default_state_dir

    state_dir = args.state_dir or default_state_dir()
    try:
        token = read_token(state_dir)
    except OSError as exc:
        sys.stderr.write(f"blink http-token: no token in {state_dir} ({exc.strerror}): start `blink serve --http "
                         "127.0.0.1:8787` first (with the same --state-dir)\n")
        return EXIT_FAIL
    sys.stdout.write(f"http://{args.url}/#token={token}\n" if args.url else token + "\n")
    return 0


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
    from .daemon import serve
    from .listeners import ListenError, parse_tcp, vsock_address
    from .serveconfig import daemon_config, render, resolve, source_hint
    from .systemd import ActivationError

    try:
        settings = resolve(args)
    except ConfigError as exc:
        sys.stderr.write(f"blink serve: error: {exc}\n")
        return EXIT_USAGE
    if args.print_config:
        sys.stdout.write(render(settings))
        return 0
    try:
        if settings["tcp"]:
            parse_tcp(settings["tcp"])
        if settings["vsock-port"] is not None:
            vsock_address(settings["vsock-port"])
        cfg = daemon_config(settings)
        cfg.validate()
    except (ValueError, ConfigError) as exc:
        sys.stderr.write(f"blink serve: error: {source_hint(settings, str(exc))}\n")
        return EXIT_USAGE
    if cfg.http:
        import importlib.util

        if importlib.util.find_spec("aiohttp") is None:
            sys.stderr.write("blink serve: error: --http needs aiohttp, which is not installed: "
                             "pip install 'vhubd[http]'\n")
            return EXIT_USAGE
    try:
        setup_logging(settings["log-level"], settings["log"])
    except ImportError:
        sys.stderr.write("blink serve: error: --log journal needs systemd-python (pip install 'vhubd[systemd]')\n")
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
