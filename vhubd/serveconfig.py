"""``blink serve``'s settings from one table: its flags, the TOML config file and
``--print-config`` all come from :data:`SETTINGS`, so they cannot disagree.

Order: each setting's default, then the config file (``--config PATH``, else
``$BLINK_CONFIG``, else ``/etc/blink/vhubd.toml`` when it exists), then the flags:
a flag given wins. File keys are the flags without ``--`` (``max-output = "32M"``,
``backend = "qemu"``, ``no-anonymous = true``); an unknown key or a value of the
wrong kind is an error that names the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from typing import Any

from . import frames
from .errors import ConfigError
from .paths import DEFAULT_CONFIG, DEFAULT_SOCKET, env

SIZE_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str  # the flag without "--"; the config file's key
    kind: str  # str, int, float, seconds, size, mode, bool, choice
    default: Any
    help: str
    field: str = ""  # DaemonConfig's name for it ("" = the key with "_"; "-" = not a DaemonConfig field)
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    default_text: str | None = None  # how --help shows a default that is computed

    @property
    def dest(self) -> str:
        return self.key.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.key


S = Setting
SETTINGS: tuple[Setting, ...] = (
    S("socket", "str", DEFAULT_SOCKET, "guest-facing Unix socket (where the VMM maps guest vsock port 10000)",
      metavar="PATH"),
    S("control", "str", None, "control socket for host clients", metavar="PATH",
      default_text="$XDG_RUNTIME_DIR/blink/control.sock, /run/blink/control.sock for root"),
    S("tcp", "str", None, "guest-facing loopback TCP listener (token required)", metavar="HOST:PORT"),
    S("vsock-port", "int", None, "AF_VSOCK guest listener port", metavar="N"),
    S("socket-mode", "mode", None, "mode of the guest socket, octal", metavar="MODE",
      default_text="the umask's"),
    S("anonymous-session", "str", "default", "session of agents that send an empty handshake (Blink's)",
      metavar="NAME"),
    S("no-anonymous", "bool", False, "refuse agents without a session", field="-"),
    S("max-payload", "size", frames.DEFAULT_MAX_PAYLOAD, "largest frame payload; above it frame_too_large"),
    S("handshake-timeout", "seconds", 10.0, "seconds a new connection has to send its handshake"),
    S("stall-timeout", "seconds", 10.0, "seconds a peer may stall in the middle of a frame"),
    S("heartbeat", "float", 10.0, "heartbeat interval in seconds (0: off); silent peers go after 3 of them",
      field="heartbeat_interval", metavar="SECONDS"),
    S("rpc-timeout", "seconds", 30.0, "seconds a forwarded RPC waits for its answer"),
    S("max-connections", "int", 10000, "guest connections, at most"),
    S("max-clients", "int", 1024, "control-socket connections, at most (counted apart from guests)"),
    S("max-sessions", "int", 10_000, "sessions the daemon holds, at most"),
    S("max-attached", "int", 64, "attached guest connections per session"),
    S("max-inflight", "int", 1024, "RPCs one connection may have in flight"),
    S("max-output", "size", 32 << 20, "bytes queued toward one connection, at most (slow_consumer above)"),
    S("max-handshake", "size", 64 << 10, "handshake payload, at most"),
    S("guest-dir", "str", None, "per-session guest sockets DIR/<session>.sock (Firecracker, cloud-hypervisor, "
      "libkrun map a VM's vsock port to it): the socket names the session, no token", metavar="DIR"),
    S("scrollback", "size", 1 << 20, "bytes of output kept per session and replayed to clients that ask"),
    S("lossy-limit", "size", 4 << 20, "bytes queued toward a lossy subscriber before slow_consumer"),
    S("multiple-agents", "bool", False, "allow several agents per session", field="allow_multiple_agents"),
    S("backend", "choice", "auto", "how sessions boot (auto: boxlite where VMs can boot, else external)",
      choices=("auto", "boxlite", "qemu", "local", "external")),
    S("state-dir", "str", None, "per-daemon state (session store, BoxLite home, session dirs, guest images)",
      metavar="DIR", default_text="$BLINK_STATE_DIR, /var/lib/blink for root, else ~/.local/state/blink"),
    S("boot-timeout", "seconds", 120.0, "seconds a boot may take, agent handshake included"),
    S("idle-stop", "seconds", None, "stop booted sessions with no clients and no agent traffic for this long",
      default_text="never"),
    S("standby-after", "seconds", None, "put booted sessions with no agent traffic for this long in standby "
      "(qemu: the VM paused, local: the agent's processes stopped; anything sent to it wakes it)",
      default_text="never"),
    S("stop-after", "seconds", None, "stop sessions that have been in standby this long", default_text="never"),
    S("snapshot-after", "seconds", None, "snapshot booted sessions with no clients and no agent traffic for this long "
      "and stop them (qemu); the next request restores the snapshot instead of booting cold", default_text="never"),
    S("image", "str", None, "boxlite: an OCI reference (a registry image) or a local OCI layout directory; qemu: "
      "a guest image directory", metavar="IMAGE",
      default_text="boxlite: the layout `blink build-image` builds from Debian packages, built on first use; "
                   "qemu: what `blink build-guest` made"),
    S("qemu-accel", "choice", "auto", "qemu backend: auto = KVM when a probe VM runs on it, else TCG",
      choices=("auto", "kvm", "tcg")),
    S("agent-command", "str", None, "local backend: the command that runs the guest agent", metavar="CMD",
      default_text="this Python -m blink_agent serve, with the agent vhubd ships"),
    S("http", "str", None, "serve the control-plane API (Blink's REST + WebSocket attach) and the web terminal: "
      "HOST:PORT (loopback unless --http-public) or unix:PATH", metavar="ADDR", default_text="off"),
    S("http-public", "bool", False, "let --http bind a non-loopback address"),
    S("http-origin", "str", None, "cross-origin browser requests allowed from these origins (comma-separated, "
      "e.g. https://console.example.com; * for any)", metavar="ORIGINS", default_text="none: same origin only"),
    S("http-buffer", "size", 1 << 20, "output kept per execution for attach ?after= (Blink's "
      "BLINK_ATTACH_BUFFER_BYTES)"),
    S("http-linger", "seconds", 300.0, "seconds an execution's record is kept after it ends (Blink's "
      "BLINK_ATTACH_LINGER_SECS)"),
    S("http-max-executions", "int", 64, "executions the HTTP API keeps at once (each up to --http-buffer)"),
    S("http-max-body", "size", 1 << 20, "largest HTTP request body and WebSocket message"),
    S("http-max-connections", "int", 256, "HTTP requests and WebSockets open at once"),
    S("http-run-output", "size", 16 << 20, "stdout and stderr kept each for a /runs answer (beyond: "
      "*_truncated); ndjson streams without a bound"),
    S("once", "bool", False, "Blink one-shot mode: one agent, its first RPC, exit"),
    S("log-level", "choice", "info", "log verbosity", choices=("debug", "info", "warning", "error"), field="-"),
    S("log", "choice", "auto", "journal: structured journald entries (needs systemd-python); auto: journal when "
      "stderr is systemd's journal stream, else stderr", choices=("auto", "journal", "stderr"), field="-"),
)
BY_KEY = {s.key: s for s in SETTINGS}


# -- values --------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    t = text.strip().lower().rstrip("ib")
    try:
        if t and t[-1] in SIZE_UNITS:
            return int(float(t[:-1]) * SIZE_UNITS[t[-1]])
        return int(t)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (bytes, or with K, M, G)") from None


def show_size(n: int) -> str:
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def from_text(s: Setting, text: str) -> Any:
    """A flag's text as the setting's value; ValueError with a short reason."""
    if s.kind == "size":
        return parse_size(text)
    if s.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"not an integer: {text!r}") from None
    if s.kind in ("float", "seconds"):
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
        if s.kind == "seconds" and v <= 0:
            raise ValueError(f"must be > 0: {text!r}")
        return v
    if s.kind == "mode":
        try:
            return int(text, 8)
        except ValueError:
            raise ValueError(f"not an octal mode: {text!r}") from None
    return text


def from_toml(s: Setting, value: Any) -> Any:
    """A config file's value as the setting's value; ValueError with a short reason."""
    if s.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value
    if isinstance(value, bool):
        raise ValueError(f"must be {_kind_words(s)}, not a boolean")
    if s.kind in ("int", "size", "mode") and isinstance(value, int):
        return value
    if s.kind in ("float", "seconds") and isinstance(value, (int, float)):
        if s.kind == "seconds" and value <= 0:
            raise ValueError(f"must be > 0, got {value!r}")
        return float(value)
    if isinstance(value, str) and s.kind != "str" and s.kind != "choice":
        return from_text(s, value)
    if s.kind in ("str", "choice") and isinstance(value, str):
        if s.choices and value not in s.choices:
            raise ValueError(f"must be one of {', '.join(s.choices)}, got {value!r}")
        return value
    raise ValueError(f"must be {_kind_words(s)}, got {type(value).__name__}")


def _kind_words(s: Setting) -> str:
    return {"str": "a string", "choice": "a string", "int": "an integer", "size": 'a size (bytes or "16M")',
            "mode": "a mode (0o660 or \"660\")", "float": "a number", "seconds": "a number of seconds",
            "bool": "true or false"}[s.kind]


def to_toml(s: Setting, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if s.kind == "size":
        return f'"{show_size(value)}"'
    if s.kind == "mode":
        return f"0o{value:o}"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    return repr(value)


def show_default(s: Setting) -> str:
    if s.default_text:
        return s.default_text
    if s.default is None:
        return "none"
    if s.kind == "size":
        return show_size(s.default)
    if s.kind == "bool":
        return "off" if not s.default else "on"
    return f"{s.default:g}" if isinstance(s.default, float) else str(s.default)


# -- the parser ----------------------------------------------------------------------------

def _arg_type(s: Setting):
    def convert(text: str) -> Any:
        try:
            return from_text(s, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = s.kind  # argparse names the type in its message
    return convert


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting as a flag; none has an argparse default (None = not given),
    their help shows the real default."""
    parser.add_argument("--config", metavar="PATH",
                        help=f"TOML file of settings (keys: these flags without --); flags win over it "
                             f"(default: $BLINK_CONFIG, else {DEFAULT_CONFIG} when it exists)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the settings in effect (defaults, file, flags) as TOML and exit")
    group = parser.add_mutually_exclusive_group()
    for s in SETTINGS:
        target = group if s.key in ("anonymous-session", "no-anonymous") else parser
        text = f"{s.help} (default: {show_default(s)})"
        if s.kind == "bool":
            target.add_argument(s.flag, action="store_const", const=True, default=None, help=text)
        elif s.kind == "choice":
            target.add_argument(s.flag, choices=s.choices, default=None, help=text)
        else:
            target.add_argument(s.flag, type=_arg_type(s), default=None, metavar=s.metavar or _metavar(s),
                                help=text)


def _metavar(s: Setting) -> str:
    return {"size": "BYTES", "seconds": "SECONDS", "int": "N", "float": "N", "mode": "MODE"}.get(s.kind, "VALUE")


# -- the file and the merge ----------------------------------------------------------------

def config_path(given: str | None) -> tuple[str | None, bool]:
    """(path, explicit): the file to read, and whether someone named it (then it must exist)."""
    if given:
        return given, True
    named = env("BLINK_CONFIG")
    if named:
        return named, True
    return (DEFAULT_CONFIG, False) if os.path.exists(DEFAULT_CONFIG) else (None, False)


def load_file(path: str) -> dict[str, Any]:
    """The settings in ``path``, checked; ConfigError names the file and the key."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        s = BY_KEY.get(key) or BY_KEY.get(key.replace("_", "-"))
        if s is None:
            raise ConfigError(f"{path}: unknown setting {key[:80]!r} (keys are the serve flags without --; "
                              "blink serve --help lists them)")
        try:
            out[s.key] = from_toml(s, value)
        except ValueError as exc:
            raise ConfigError(f"{path}: {s.key}: {exc}") from None
    if out.get("no-anonymous") and "anonymous-session" in out:
        raise ConfigError(f"{path}: anonymous-session and no-anonymous exclude each other")
    return out


@dataclasses.dataclass
class Resolved:
    values: dict[str, Any]  # key -> value in effect
    sources: dict[str, str]  # key -> "default" | the file's path | "flag"
    path: str | None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def resolve(args: argparse.Namespace) -> Resolved:
    """Defaults, then the file, then the flags given."""
    path, explicit = config_path(getattr(args, "config", None))
    from_file = load_file(path) if path and (explicit or os.path.exists(path)) else {}
    values = {s.key: s.default for s in SETTINGS}
    sources = {s.key: "default" for s in SETTINGS}
    for key, value in from_file.items():
        values[key], sources[key] = value, str(path)
    given = {s.key: getattr(args, s.dest) for s in SETTINGS if getattr(args, s.dest, None) is not None}
    if "anonymous-session" in given:  # the flag names an anonymous session: it is on
        values["no-anonymous"], sources["no-anonymous"] = False, "flag"
    if given.get("no-anonymous"):
        values["anonymous-session"], sources["anonymous-session"] = None, "flag"
    for key, value in given.items():
        values[key], sources[key] = value, "flag"
    if values["no-anonymous"]:
        values["anonymous-session"] = None
    return Resolved(values, sources, str(path) if from_file or explicit else None)


def daemon_config(resolved: Resolved):
    """The DaemonConfig of these settings (``validate`` it before use)."""
    from .settings import DaemonConfig

    kw: dict[str, Any] = {}
    for s in SETTINGS:
        if s.field != "-":
            kw[s.field or s.dest] = resolved[s.key]
    kw["dead_after"] = 3 * resolved["heartbeat"]
    return DaemonConfig(**kw)


def render(resolved: Resolved) -> str:
    """The settings in effect as a TOML file that ``--config`` reads back."""
    lines = ["# blink serve --print-config: defaults, then "
             + (f"{resolved.path}, then " if resolved.path else "(no config file), then ") + "the flags",
             "# (a flag wins over the file; unset settings are comments)"]
    for s in SETTINGS:
        value, source = resolved.values[s.key], resolved.sources[s.key]
        where = "" if source == "default" else f"  # {'flag' if source == 'flag' else 'file'}"
        if s.key == "anonymous-session" and value is None:
            lines.append(f"# anonymous-session: none (no-anonymous){where}")
        elif value is None:
            lines.append(f"# {s.key}: not set" + (f" (default: {s.default_text})" if s.default_text else "")
                         + where)
        else:
            lines.append(f"{s.key} = {to_toml(s, value)}{where}")
    return "\n".join(lines) + "\n"


def source_hint(resolved: Resolved, message: str) -> str:
    """A validation message names a flag; say so when the value came from the file."""
    for s in SETTINGS:
        if message.startswith(s.flag + " ") or message.startswith(s.flag + ":"):
            source = resolved.sources.get(s.key)
            if source not in (None, "default", "flag"):
                return f"{message} (set as {s.key} in {source})"
    return message
