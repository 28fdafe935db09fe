"""The ``blink-agent`` command: ``serve`` (resident agent) and ``run`` (pipe mode).

Exit codes: 0 success; 2 usage error or bad address; 69 (EX_UNAVAILABLE) when
``run`` cannot reach the daemon or is refused; otherwise ``run`` exits with the
command's code (128 + N when it died of signal N).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from ._version import __version__
from .address import DEFAULT_ADDR, parse_address
from .async_hub import AsyncHub
from .channels import ChannelManager
from .copies import CopyMethods
from .errors import AddressError, ConnectionLost, HandshakeRejected, ProtocolError, RpcError
from .outbox import DEFAULT_BUFFER_BYTES, parse_size
from .runner import ExecutionManager

__all__ = ["main", "build_parser", "EX_UNAVAILABLE"]

EX_UNAVAILABLE = 69
log = logging.getLogger("blink_agent")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    env_buffer = os.environ.get("VHUB_BUFFER_BYTES")
    parser.add_argument(
        "--addr",
        default=os.environ.get("VHUB_ADDR") or DEFAULT_ADDR,
        help="daemon address: vsock://CID:PORT, unix:/path or tcp://host:port "
        f"(env VHUB_ADDR, default {DEFAULT_ADDR})",
    )
    parser.add_argument(
        "--session",
        default=os.environ.get("VHUB_SESSION") or None,
        help="session name (env VHUB_SESSION); none: the anonymous session",
    )
    parser.add_argument(
        "--token", default=os.environ.get("VHUB_TOKEN", ""), help="session token (env VHUB_TOKEN)"
    )
    parser.add_argument(
        "--buffer-bytes",
        type=_size,
        default=None,
        help="bound of the output buffer kept while disconnected or unacknowledged "
        "(env VHUB_BUFFER_BYTES, default %s)" % (env_buffer or DEFAULT_BUFFER_BYTES),
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="ping the daemon this often (default 10)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="reconnect after this long without traffic from the daemon (default 30)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive,
        default=10.0,
        metavar="SECONDS",
        help="bound on dialing and on the handshake (default 10)",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default: info for serve, warning for run)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blink-agent",
        description="V-Hub guest agent: connects to the host daemon over BLIN and serves it.",
    )
    parser.add_argument("--version", action="version", version=f"blink-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="stay connected and serve agent.run / agent.kill / agent.ping / agent.info",
        description="Resident agent: connect, handshake, heartbeat, reconnect forever.",
    )
    _common(serve)
    run = sub.add_parser(
        "run",
        help="run a command and relay its output (Blink pipe mode)",
        description="Run CMD, relay its stdout/stderr live as execution 1, report its "
        "result and exit with its exit code.",
    )
    _common(run)
    run.add_argument(
        "--result-timeout",
        type=_positive,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the daemon to acknowledge the result (default 30)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    return parser


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s blink-agent[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger("blink_agent")
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False


def _hub(args: argparse.Namespace, *, reconnect: bool = True) -> AsyncHub:
    return AsyncHub(
        args.addr,
        args.session,
        args.token,
        buffer_bytes=args.buffer_bytes,
        heartbeat_interval=args.heartbeat_interval,
        idle_timeout=args.idle_timeout,
        connect_timeout=args.connect_timeout,
        handshake_timeout=args.connect_timeout,
        reconnect=reconnect,
    )


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    hub = _hub(args)
    manager = ExecutionManager(hub)
    manager.register()
    channels = ChannelManager(hub)
    channels.register()
    CopyMethods(channels).register()
    stop: asyncio.Future[str] = loop.create_future()

    def request_stop(sig: int) -> None:
        if not stop.done():
            stop.set_result(signal.Signals(sig).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, request_stop, sig)
    log.info("blink-agent %s serving, daemon at %s (pid %d)", __version__, hub.address, os.getpid())
    await hub.start(wait=False)
    try:
        why = await stop
        log.info("stopping (%s)", why)
    finally:
        await manager.shutdown()
        await hub.close(flush_timeout=2.0)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


async def _run(args: argparse.Namespace, argv: list[str]) -> int:
    loop = asyncio.get_running_loop()
    hub = _hub(args)
    try:
        await hub.start(wait=True)
    except (ConnectionLost, HandshakeRejected, ProtocolError) as exc:
        sys.stderr.write(f"blink-agent: {exc}\n")
        return EX_UNAVAILABLE
    manager = ExecutionManager(hub, new_session=False, result_timeout=args.result_timeout)
    try:
        try:
            execution = await manager.start(argv, inherit_stdin=True)
        except RpcError as exc:
            message = f"blink-agent: cannot run {argv[0]}: {exc.message}\n"
            sys.stderr.write(message)
            await hub.stderr(message, execution_id=1)
            failed: dict[str, Any] = {
                "event": "execution_result",
                "execution_id": 1,
                "exit_code": 127,
                "signal": None,
                "stdout_bytes": 0,
                "stderr_bytes": len(message.encode()),
            }
            await asyncio.wait_for(manager.report(failed), args.result_timeout + 1)
            return 127
        forwarded = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in forwarded:
            loop.add_signal_handler(sig, execution.send_signal, sig)
        try:
            result = await execution.exited
        finally:
            for sig in forwarded:
                loop.remove_signal_handler(sig)
        try:
            await asyncio.wait_for(asyncio.shield(execution.done), args.result_timeout + 1)
        except asyncio.TimeoutError:
            log.error("the daemon did not acknowledge the result within %g s", args.result_timeout)
        code = int(result["exit_code"])
        return code if code >= 0 else 128 - code
    finally:
        await manager.shutdown(grace=1.0)
        await hub.close(flush_timeout=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    _setup_logging(args.log_level or ("info" if args.command == "serve" else "warning"))
    if args.buffer_bytes is None:
        env = os.environ.get("VHUB_BUFFER_BYTES")
        try:
            args.buffer_bytes = _size(env) if env else DEFAULT_BUFFER_BYTES
        except argparse.ArgumentTypeError as exc:
            sys.stderr.write(f"blink-agent: VHUB_BUFFER_BYTES: {exc}\n")
            return 2
    try:
        args.addr = parse_address(args.addr)
    except AddressError as exc:
        sys.stderr.write(f"blink-agent: {exc}\n")
        return 2
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
        command: list[Any] = list(args.argv)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            sys.stderr.write("blink-agent: run needs a command: blink-agent run -- CMD [ARGS...]\n")
            return 2
        return asyncio.run(_run(args, command))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
