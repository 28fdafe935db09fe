"""``blink serve``'s settings: one table behind the flags, the TOML file and
``--print-config``; flags win; every flag has help with its default; bad files
and bad values are one-line errors naming the file and the key; a daemon runs
with what the file says. And a socket path in a directory that does not exist
is an error, not a directory made up."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest

from vhubd import serveconfig
from vhubd.cli import build_parser

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a value other than the default for every setting (what a file can say)
OTHER = {
    "socket": "/run/x/guest.sock", "control": "/run/x/control.sock", "tcp": "127.0.0.1:7000", "vsock-port": 10001,
    "socket-mode": 0o600, "anonymous-session": "anon", "max-payload": "8M", "handshake-timeout": 3,
    "stall-timeout": 4.5, "heartbeat": 0, "rpc-timeout": 9, "max-connections": 77, "max-clients": 78,
    "max-sessions": 79, "max-attached": 5, "max-inflight": 80, "max-output": "1M", "max-handshake": "4K",
    "guest-dir": "/run/x/guests", "scrollback": 4096, "lossy-limit": "2M", "multiple-agents": True,
    "backend": "qemu", "state-dir": "/var/lib/x", "boot-timeout": 30, "idle-stop": 600, "standby-after": 30, "stop-after": 900, "snapshot-after": 1800, "image": "img:1",
    "qemu-accel": "tcg", "agent-command": "blink-agent serve", "once": True, "log-level": "debug",
    "log": "stderr", "http": "127.0.0.1:8788", "http-public": True, "http-origin": "https://c.example",
    "http-buffer": "2M", "http-linger": 60, "http-max-executions": 8, "http-max-body": "64K",
    "http-max-connections": 9, "http-run-output": "1M",
}


def serve(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("BLINK_")}
    return subprocess.run([PY, "-m", "vhubd", "serve", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**e, **(env or {})})


def toml_text(values: dict) -> str:
    out = []
    for k, v in values.items():
        if isinstance(v, bool):
            out.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, str):
            out.append(f'{k} = "{v}"')
        else:
            out.append(f"{k} = {v}")
    return "\n".join(out) + "\n"


def effective(text: str) -> dict:
    return tomllib.loads(text)


def test_the_table_covers_every_serve_flag_and_each_has_help_with_its_default():
    parser = build_parser()
    serve_parser = parser._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    flags = {a.option_strings[0][2:] for a in serve_parser._actions if a.option_strings and a.dest != "help"}
    assert flags - {"config", "print-config"} == set(serveconfig.BY_KEY)
    assert set(OTHER) == set(serveconfig.BY_KEY) - {"no-anonymous"}
    for action in serve_parser._actions:
        if action.dest in ("help", "config", "print_config"):
            assert action.help
            continue
        assert action.help and "(default: " in action.help, action.option_strings
    helptext = serve("--help").stdout
    assert "(default: 32M)" in " ".join(helptext.split())  # --max-output


def test_every_setting_from_the_file_and_flags_win(tmp_path):
    conf = tmp_path / "vhubd.toml"
    conf.write_text(toml_text(OTHER))
    r = serve("--config", str(conf), "--print-config")
    assert r.returncode == 0, r.stderr
    got = effective(r.stdout)
    want = dict(OTHER, **{"max-payload": "8M", "max-output": "1M", "max-handshake": "4K", "scrollback": "4K",
                          "lossy-limit": "2M", "no-anonymous": False})
    for key, value in want.items():
        assert got[key] == value, key
    assert f"{str(conf)}, then the flags" in r.stdout and "max-connections = 77  # file" in r.stdout
    r = serve("--config", str(conf), "--print-config", "--max-connections", "5", "--backend", "local",
              "--no-anonymous")
    got = effective(r.stdout)
    assert (got["max-connections"], got["backend"], got["no-anonymous"]) == (5, "local", True)
    assert "anonymous-session" not in got and "max-connections = 5  # flag" in r.stdout


def test_print_config_reads_back_as_the_same_settings(tmp_path):
    first = serve("--print-config", "--max-output", "3M", "--tcp", "127.0.0.1:0", "--socket-mode", "640",
                  "--idle-stop", "12.5")
    assert first.returncode == 0, first.stderr
    (tmp_path / "c.toml").write_text(first.stdout)
    again = serve("--config", str(tmp_path / "c.toml"), "--print-config")
    assert again.returncode == 0, again.stderr
    assert effective(again.stdout) == effective(first.stdout)
    assert effective(first.stdout)["socket-mode"] == 0o640


def test_config_from_the_environment_and_defaults(tmp_path):
    conf = tmp_path / "env.toml"
    conf.write_text('backend = "local"\n')
    r = serve("--print-config", env={"BLINK_CONFIG": str(conf)})
    assert effective(r.stdout)["backend"] == "local"
    r = serve("--print-config")
    got = effective(r.stdout)
    assert got["backend"] == "auto" and got["max-payload"] == "16M" and got["anonymous-session"] == "default"
    path, explicit = serveconfig.config_path(None)
    assert explicit is False and path in (None, "/etc/blink/vhubd.toml")


@pytest.mark.parametrize("text, words", [
    ("max_sessions = 5\nnope = 1\n", "unknown setting 'nope'"),
    ('max-output = "lots"\n', "max-output: not a size: 'lots'"),
    ("max-connections = \"ten\"\n", "max-connections: not an integer: 'ten'"),
    ("multiple-agents = 1\n", "multiple-agents: must be true or false"),
    ('backend = "vmware"\n', "backend: must be one of auto, boxlite, qemu, local, external, got 'vmware'"),
    ("rpc-timeout = 0\n", "rpc-timeout: must be > 0"),
    ("socket = [1, 2]\n", "socket: must be a string, got list"),
    ("heartbeat = -1\n", "--heartbeat must be 0 or more, got -1.0 (set as heartbeat in "),
    ("max-payload = 0\n", "--max-payload must be from 1 to "),
    ("this is not toml\n", "not valid TOML"),
    ('anonymous-session = "a"\nno-anonymous = true\n', "anonymous-session and no-anonymous exclude each other"),
])
def test_bad_files_are_one_line_errors(tmp_path, text, words):
    conf = tmp_path / "bad.toml"
    conf.write_text(text)
    r = serve("--config", str(conf), "--socket", str(tmp_path / "g.sock"), "--control", str(tmp_path / "c.sock"),
              "--state-dir", str(tmp_path / "st"))
    assert r.returncode == 2 and r.stdout == ""
    [line] = r.stderr.splitlines()
    assert line.startswith("blink serve: error: ") and words in line, line
    assert not (tmp_path / "g.sock").exists()


def test_missing_config_file_is_an_error(tmp_path):
    r = serve("--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and r.stderr == f"blink serve: error: --config {tmp_path / 'nope.toml'}: no such file\n"


def test_a_daemon_runs_with_the_file(tmp_path):
    from harness import Daemon

    conf = tmp_path / "vhubd.toml"
    conf.write_text('anonymous-session = "from-file"\nmax-sessions = 3\nbackend = "external"\n')
    d = Daemon(tmp_path / "d", "--config", str(conf)).start()
    try:
        names = [s["name"] for s in d.call("vhub.sessions")]
        assert names == ["from-file"]
        d.call("vhub.register", {"session": "a"})
        d.call("vhub.register", {"session": "b"})
        with pytest.raises(RuntimeError, match="too_many_sessions"):
            d.call("vhub.register", {"session": "c"})
    finally:
        d.stop()


@pytest.mark.parametrize("flag", ["--socket", "--control"])
def test_a_socket_in_a_missing_directory_is_an_error(tmp_path, flag):
    missing = tmp_path / "no" / "such" / "dir"
    args = {"--socket": str(tmp_path / "g.sock"), "--control": str(tmp_path / "c.sock")}
    args[flag] = str(missing / "x.sock")
    r = serve("--backend", "external", "--state-dir", str(tmp_path / "st"), *[x for kv in args.items() for x in kv])
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (f"blink serve: error: cannot listen on {missing / 'x.sock'}: the directory "
                                         f"{missing} does not exist")
    assert not (tmp_path / "no").exists()
