"""The daemon's settings: one dataclass, its bounds, and their validation.

``DaemonConfig`` holds every ``blink serve`` setting with its default;
``validate`` refuses nonsense (a zero payload limit, a negative heartbeat, a
mode past 0777...) with one line that names the flag, before anything starts.
"""

from __future__ import annotations

import dataclasses
import os

from . import frames
from .errors import ConfigError, InvalidName
from .paths import DEFAULT_SOCKET
from .relay import Config as RelayConfig
from .sessions import validate_name

FLAG_OF = {"heartbeat_interval": "--heartbeat", "allow_multiple_agents": "--multiple-agents"}
INF = float("inf")
# setting, lowest, highest
_RANGES = (
    ("max_payload", 1, frames.MAX_U32), ("handshake_timeout", 1e-3, INF), ("stall_timeout", 1e-3, INF),
    ("heartbeat_interval", 0, INF), ("dead_after", 0, INF), ("rpc_timeout", 1e-3, INF),
    ("max_connections", 1, 1 << 24), ("max_clients", 1, 1 << 24), ("max_sessions", 1, 1 << 24),
    ("max_attached", 1, 1 << 20), ("max_inflight", 1, 1 << 24), ("scrollback", 0, 1 << 40),
    ("lossy_limit", 1024, 1 << 40), ("high_water", 1024, 1 << 40), ("max_output", 1 << 16, 1 << 40),
    ("max_handshake", 64, frames.MAX_U32), ("cut_through", 1024, 1 << 40), ("boot_timeout", 1e-3, INF),
    ("idle_stop", 1e-3, INF), ("standby_after", 1e-3, INF), ("stop_after", 1e-3, INF), ("snapshot_after", 1e-3, INF),
    ("vsock_port", 1, 0xFFFFFFFF),
    ("http_buffer", 1024, 1 << 30), ("http_linger", 0, INF), ("http_max_executions", 1, 1 << 16),
    ("http_max_body", 1024, 1 << 30), ("http_max_connections", 1, 1 << 20), ("http_run_output", 0, 1 << 40),
)


def flag(name: str) -> str:
    return FLAG_OF.get(name, "--" + name.replace("_", "-"))


def _describe(low, high) -> str:
    if high == INF:
        return f"at least {low:g}" if low else "0 or more"
    return f"from {low:g} to {high:g}"


@dataclasses.dataclass
class DaemonConfig:
    socket: str | None = DEFAULT_SOCKET
    control: str | None = None
    tcp: str | None = None
    vsock_port: int | None = None
    socket_mode: int | None = None
    control_mode: int = 0o660
    anonymous_session: str | None = "default"
    max_payload: int = frames.DEFAULT_MAX_PAYLOAD
    handshake_timeout: float = 10.0
    stall_timeout: float = 10.0
    heartbeat_interval: float = 10.0
    dead_after: float = 30.0
    rpc_timeout: float = 30.0
    max_connections: int = 10000
    scrollback: int = 1 << 20
    lossy_limit: int = 4 << 20
    high_water: int = 1 << 20
    cut_through: int = 256 * 1024
    initial_buffer: int = 2048
    tick: float = 1.0
    status_interval: float = 2.0  # how often systemd's STATUS= is refreshed (sent only when it changed)
    close_grace: float = 5.0
    drain_timeout: float = 5.0
    allow_multiple_agents: bool = False
    backend: str = "auto"
    state_dir: str | None = None
    boot_timeout: float = 120.0
    idle_stop: float | None = None
    standby_after: float | None = None  # idle this long: standby (paused, memory kept)
    stop_after: float | None = None  # in standby this long: stopped
    snapshot_after: float | None = None  # idle this long: snapshot "auto", stopped; the next boot restores it
    image: str | None = None
    agent_command: str | None = None
    qemu_accel: str = "auto"  # qemu backend: auto (KVM if a probe VM runs), kvm, tcg
    once: bool = False
    # bounds on what peers can make the daemon hold (DESIGN §12)
    max_clients: int = 1024  # control-socket connections (apart from guests: no guest locks the operator out)
    max_sessions: int = 10_000
    max_attached: int = 64  # attached guest connections per session
    max_inflight: int = 1024  # RPCs one peer may have in flight
    max_output: int = 32 << 20  # bytes queued toward one peer, at most
    max_handshake: int = 64 << 10  # payload of a handshake frame, checked from its header
    guest_dir: str | None = None  # per-session guest sockets DIR/<session>.sock
    # the HTTP API (vhubd/api): off unless http is set
    http: str | None = None
    http_public: bool = False
    http_origin: str | None = None
    http_buffer: int = 1 << 20
    http_linger: float = 300.0
    http_max_executions: int = 64
    http_max_body: int = 1 << 20
    http_max_connections: int = 256
    http_run_output: int = 16 << 20

    def relay_config(self) -> RelayConfig:
        return RelayConfig(max_payload=self.max_payload, anonymous_session=self.anonymous_session,
                           rpc_timeout=self.rpc_timeout, scrollback=self.scrollback,
                           lossy_limit=self.lossy_limit, high_water=self.high_water,
                           allow_multiple_agents=self.allow_multiple_agents, max_attached=self.max_attached,
                           max_channel_frame=min(frames.CHANNEL_FRAME, self.cut_through),
                           default_backend=self.backend)

    def validate(self) -> None:
        """Refuse nonsense before anything starts: ``ConfigError`` naming the flag."""
        for name, low, high in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{flag(name)} must be {_describe(low, high)}, got {value!r}")
        for name in ("socket_mode", "control_mode"):
            mode = getattr(self, name)
            if mode is not None and not 0 <= mode <= 0o777:
                raise ConfigError(f"{flag(name)} must be a file mode from 000 to 777 (octal), got {mode:o}")
        if self.anonymous_session is not None:
            try:
                validate_name(self.anonymous_session)
            except InvalidName as exc:
                raise ConfigError(f"--anonymous-session: {exc}") from None
        if self.http is not None:
            from .api.access import check_http_address

            if self.once:
                raise ConfigError("--http does not combine with --once (Blink's one-shot serve has no sessions to "
                                  "serve over HTTP)")

            check_http_address(self.http, self.http_public)
        if self.guest_dir is not None and not os.path.isdir(self.guest_dir):
            raise ConfigError(f"--guest-dir {self.guest_dir}: no such directory")



