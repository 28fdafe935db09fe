"""Daemon lifecycle: configuration, listeners, signals, graceful shutdown,
and Blink's one-shot ``--once`` mode."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable

import uvloop

from . import frames
from .errors import BackendStartError, OnceError
from .guestdir import GuestDir
from .listeners import ListenerSpec, bind_tcp, bind_unix, bind_vsock, parse_tcp
from .paths import DEFAULT_SOCKET, default_control_path, default_state_dir  # noqa: F401 (re-exported)
from .portserver import PortServer
from .protocol import Connection, Frame, Handshake, RemoteErrorEvent, Side, StreamRun, Violation
from .relay import Relay
from .server import Server
from .sessions import SessionRegistry
from .settings import DaemonConfig
from .store import SessionStore

log = logging.getLogger("vhubd")

def make_listeners(cfg: DaemonConfig, inherited: dict | None = None) -> list[ListenerSpec]:
    """The listeners: sockets passed by systemd (``inherited``, by fd name,
    see ``systemd.FD_NAMES``) where given, else bound here from ``cfg``. An
    inherited socket has no ``owned_path``: it is never unlinked or re-bound."""
    inherited = dict(inherited or {})
    specs = []

    def take(name: str, role: str, **kw) -> bool:
        socks = inherited.pop(name, [])
        for sock in socks:
            specs.append(ListenerSpec(name, role, sock, activated=True, **kw))
        if socks:
            log.info("socket activation: %s listener from systemd (%s)", name,
                     ", ".join(str(s.getsockname()) for s in socks))
        return bool(socks)

    try:
        if not take("vhub", "guest") and cfg.socket:
            specs.append(ListenerSpec("vhub", "guest", bind_unix(cfg.socket, cfg.socket_mode),
                                      owned_path=cfg.socket))
        if not take("tcp", "guest", token_required=True) and cfg.tcp:
            host, port = parse_tcp(cfg.tcp)
            specs.append(ListenerSpec("tcp", "guest", bind_tcp(host, port), token_required=True))
        if not take("vsock", "guest") and cfg.vsock_port is not None:
            specs.append(ListenerSpec("vsock", "guest", bind_vsock(cfg.vsock_port)))
        if not take("control", "client"):
            control = cfg.control or default_control_path()
            specs.append(ListenerSpec("control", "client", bind_unix(control, cfg.control_mode,
                                                                     create_parent=not cfg.control),
                                      owned_path=control))
    except Exception:
        for s in specs:
            s.sock.close()
        for socks in inherited.values():
            for sock in socks:
                sock.close()
        raise
    return specs


def resolve_backend(cfg: DaemonConfig) -> str:
    from .backends.boxlite import host_can_boot_vms

    if cfg.backend != "auto":
        return cfg.backend
    ok, why = host_can_boot_vms()
    if ok:
        return "boxlite"
    qemu = shutil.which("qemu-system-x86_64")
    how = (f"(QEMU at {qemu}: microvms under KVM when usable, TCG otherwise; `blink build-guest` builds their "
           "guest image)" if qemu else "(install QEMU first: apt-get install qemu-system-x86; then `blink "
           "build-guest`)")
    log.warning("backend auto: this host cannot boot BoxLite VMs (%s); using external (agents connect by "
                "themselves). For real VMs here choose --backend qemu %s; --backend local runs agents as host "
                "processes (not a sandbox); --backend boxlite needs a host with hardware KVM", why, how)
    return "external"


async def run_daemon(cfg: DaemonConfig, ready: asyncio.Event | None = None) -> int:
    from . import systemd as sd
    from .backends import make_backend
    from .boot import BootManager

    loop = asyncio.get_running_loop()
    inherited = sd.activation_sockets()  # {} unless socket-activated; unsets LISTEN_*
    cfg.backend = resolve_backend(cfg)
    if cfg.backend == "boxlite" and not cfg.tcp and "tcp" not in inherited:
        cfg.tcp = "127.0.0.1:0"  # BoxLite guests reach the host over loopback TCP
    state_dir = cfg.state_dir or default_state_dir()
    specs = make_listeners(cfg, inherited)
    server: Server | None = None

    def guest_protocol(name: str, session: str):  # for backends that are a VM's vsock device
        assert server is not None
        return server.guest_protocol(name, session)

    try:
        extra = {"accel": cfg.qemu_accel} if cfg.backend == "qemu" else {}
        backend = make_backend(cfg.backend, state_dir=state_dir, image=cfg.image, agent_command=cfg.agent_command,
                               guest_protocol=guest_protocol, **extra)
    except Exception as exc:
        for spec in specs:
            spec.sock.close()
        raise BackendStartError(f"cannot initialise the {cfg.backend} backend: {exc}") from exc
    if cfg.backend == "boxlite":
        port = next(s.sock.getsockname()[1] for s in specs if s.name == "tcp")
        addr = f"tcp://host.boxlite.internal:{port}"
    else:
        guest = next((s for s in specs if s.name == "vhub"), None)
        addr = f"unix:{guest.owned_path or guest.sock.getsockname() if guest else cfg.socket}"
    api = None
    if cfg.http:
        try:
            from .api.app import Api
        except ImportError as exc:
            for spec in specs:
                spec.sock.close()
            raise BackendStartError(f"--http needs aiohttp ({exc}): pip install 'vhubd[http]'") from None
    registry = SessionRegistry(cfg.scrollback, max_sessions=cfg.max_sessions)
    guest_dir: GuestDir | None = None
    agent_addr: str | Callable[[str], str] = addr
    if cfg.guest_dir and cfg.backend == "local":  # each agent dials its own session's socket
        agent_addr = functools.partial(GuestDir.address_in, cfg.guest_dir)
    boots = BootManager(registry, backend, state_dir=state_dir, agent_addr=agent_addr,
                        boot_timeout=cfg.boot_timeout, idle_stop=cfg.idle_stop,
                        standby_after=cfg.standby_after, stop_after=cfg.stop_after,
                        snapshot_after=cfg.snapshot_after)
    relay = Relay(cfg.relay_config(), registry, loop.call_later, boots=boots)
    boots.on_event = relay.publish  # boot phases reach events subscribers as {"type": "boot", ...}
    store = SessionStore(os.path.join(state_dir, "sessions.json"), registry, loop.call_later)
    server = Server(cfg, relay, loop)
    ports = PortServer(relay, loop)
    relay.exposures.opener = ports
    if cfg.guest_dir:
        guest_dir = GuestDir(cfg.guest_dir, server, registry, cfg.socket_mode)
    store.load(cfg.backend)  # the sessions this daemon had before: their agents get back in
    relay.on_stats = lambda: {"connections": len(server.peers), "tasks": len(asyncio.all_tasks()),
                              "listeners": {**server.addresses(), **({"http": api.address} if api else {})}}
    if cfg.http:
        api = Api(cfg, server, state_dir)
        try:
            api.bind()
        except Exception:
            for spec in specs:
                spec.sock.close()
            raise
        await api.restore(lambda name: registry.get(name) is not None)  # before any guest is accepted
    await server.start(specs)
    relay.exposures.changed = store.changed
    for name, gp, host, port in store.exposed:  # exposures last while their session does, restarts included
        sess = registry.get(name)
        if sess is not None:
            relay.exposures.open(sess, gp, host, port)
    if api is not None:
        await api.start()
    ticker = loop.create_task(_every(cfg.tick, boots.tick))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sd.install_debug_hang(loop)  # watchdog test hook, off unless BLINK_DEBUG_HANG_ON_SIGUSR2 is set
    names = ", ".join(f"{s.name}={s.owned_path or s.sock.getsockname()}{' (systemd)' if s.activated else ''}"
                      for s in specs)
    log.info("vhubd ready pid=%d listeners: %s; backend=%s codec=%s systemd=%s", os.getpid(), names, cfg.backend,
             _codec_name(), sd.IMPL.name)

    def status() -> str:
        return (f"{len(relay.registry)} sessions, {len(relay.guests)} agents, {len(relay.clients)} clients, "
                f"{len(server.peers)} connections")

    notifier = sd.Notifier(status_interval=cfg.status_interval)
    notifier.ready(status())  # every listener is live and the backend initialised
    notifier.start(loop, status)
    if ready is not None:
        ready.set()
    await stop.wait()
    notifier.stopping(f"draining {len(server.peers)} connections")
    log.info("shutting down: draining %d connections", len(server.peers))
    ticker.cancel()
    store.close()
    ports.close_all()
    if api is not None:
        await api.stop_accepting()
    await server.shutdown(cfg.drain_timeout)  # first: accept nothing more, and drop nothing accepted
    if api is not None:
        await api.finish()  # what the executions' records hold, for the next daemon
    await boots.close()
    if guest_dir is not None:
        guest_dir.close_all()
    log.info("stopped")
    return 0


async def _every(seconds: float, fn) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            fn()
        except Exception:
            log.exception("periodic %s failed", getattr(fn, "__qualname__", fn))


def _codec_name() -> str:
    from . import codec

    return codec.BACKEND


# --- Blink one-shot mode ----------------------------------------------------------

async def run_once(cfg: DaemonConfig) -> int:
    """Blink's ``blink-cli serve``: one guest, answer its handshake, copy its
    output to our stdout/stderr, answer the first RpcRequest with ``{}``,
    print that request's payload as one line, exit 0."""
    from . import systemd as sd

    loop = asyncio.get_running_loop()
    inherited = sd.activation_sockets()
    guest = inherited.pop("vhub", [])
    for socks in inherited.values():
        for extra in socks:
            extra.close()
    path = cfg.socket or DEFAULT_SOCKET
    sock = guest[0] if guest else bind_unix(path, cfg.socket_mode)
    accepted: asyncio.Future = loop.create_future()

    def on_client(reader, writer):
        if not accepted.done():
            accepted.set_result((reader, writer))
        else:
            writer.close()

    server = await asyncio.start_unix_server(on_client, sock=sock)
    try:
        reader, writer = await accepted
        server.close()
        conn = Connection(Side.SERVER, max_payload=cfg.max_payload, cut_through=1 << 62)
        out, err = sys.stdout.buffer, sys.stderr.buffer
        deadline = loop.time() + cfg.handshake_timeout
        handshaken = False
        while True:
            timeout = deadline - loop.time() if not handshaken else None
            if timeout is not None and timeout <= 0:
                raise OnceError(f"no handshake within {cfg.handshake_timeout:g} s")
            try:
                data = await asyncio.wait_for(reader.read(65536), timeout)
            except TimeoutError:
                raise OnceError(f"no handshake within {cfg.handshake_timeout:g} s") from None
            if not data:
                raise OnceError("the agent closed the connection before sending an RPC request")
            events = conn.receive_data(data)
            for ev in events:
                t = type(ev)
                if t is Handshake:
                    conn.accept(frames.READY_PAYLOAD, ev.request_id)
                    handshaken = True
                    events += conn.resume()
                elif t is StreamRun:
                    for f in ev.frames():
                        (err if f.msg_type == frames.MsgType.STDERR else out).write(f.payload)
                    out.flush()
                    err.flush()
                elif t is Frame:
                    if ev.msg_type == frames.MsgType.RPC_REQUEST:
                        conn.respond(ev.request_id, {})
                        writer.write(b"".join(conn.data_to_send()))
                        await writer.drain()
                        out.write(bytes(ev.payload) + b"\n")
                        out.flush()
                        writer.close()
                        return 0
                    if ev.msg_type in (frames.MsgType.TTY_RESIZE,):
                        continue
                    raise OnceError(f"unexpected {frames.MsgType(ev.msg_type).name} while waiting for an RPC")
                elif t is Violation:
                    writer.write(b"".join(conn.data_to_send()))
                    await writer.drain()
                    raise OnceError(f"protocol error from the agent: {ev.error.code}: {ev.error.message}")
                elif t is RemoteErrorEvent:
                    raise OnceError(f"the agent sent an error: {ev.code}: {ev.message}")
            pending = conn.data_to_send()
            if pending:
                writer.write(b"".join(pending))
    finally:
        server.close()
        if not guest:  # a socket from systemd is never unlinked
            try:
                os.unlink(path)
            except OSError:
                pass


def serve(cfg: DaemonConfig) -> int:
    if cfg.once:
        return uvloop.run(run_once(cfg))
    return uvloop.run(run_daemon(cfg))
