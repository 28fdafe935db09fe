"""blink_agent.address: VHUB_ADDR parsing (vsock is parsed, never dialed here)."""

from __future__ import annotations

import socket

import pytest
import test_agent_peer  # noqa: F401  (puts guest-agent/ on sys.path)

# isort: split
# blink_agent is importable once test_agent_peer has put guest-agent/ on sys.path.
from blink_agent import AddressError, parse_address
from blink_agent.address import DEFAULT_ADDR


def test_default_is_host_vsock():
    assert DEFAULT_ADDR == "vsock://2:10000"
    for text in (None, "", "  "):
        addr = parse_address(text)
        assert addr.family == "vsock"
        assert addr.params == {"cid": 2, "port": 10000}
        assert str(addr) == "vsock://2:10000"


@pytest.mark.parametrize(
    "text,family,params,shown",
    [
        ("vsock://2:10000", "vsock", {"cid": 2, "port": 10000}, "vsock://2:10000"),
        ("vsock://3:1", "vsock", {"cid": 3, "port": 1}, "vsock://3:1"),
        (
            "VSOCK://4294967295:4294967295",
            "vsock",
            {"cid": 2**32 - 1, "port": 2**32 - 1},
            "vsock://4294967295:4294967295",
        ),
        ("unix:/tmp/x.sock", "unix", {"path": "/tmp/x.sock"}, "unix:/tmp/x.sock"),
        ("unix:///tmp/x.sock", "unix", {"path": "/tmp/x.sock"}, "unix:/tmp/x.sock"),
        ("unix:rel/x.sock", "unix", {"path": "rel/x.sock"}, "unix:rel/x.sock"),
        ("unix:@abstract", "unix", {"path": "@abstract"}, "unix:@abstract"),
        ("tcp://127.0.0.1:9000", "tcp", {"host": "127.0.0.1", "port": 9000}, "tcp://127.0.0.1:9000"),
        (
            "tcp://host.boxlite.internal:7000/",
            "tcp",
            {"host": "host.boxlite.internal", "port": 7000},
            "tcp://host.boxlite.internal:7000",
        ),
        ("tcp://[::1]:65535", "tcp", {"host": "::1", "port": 65535}, "tcp://[::1]:65535"),
    ],
)
def test_good_addresses(text, family, params, shown):
    addr = parse_address(text)
    assert (addr.family, addr.params, str(addr)) == (family, params, shown)
    assert parse_address(str(addr)) == addr


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("bogus", "expected vsock://CID:PORT"),
        ("http://x:1", "unknown scheme"),
        ("vsock:2:10000", "vsock://CID:PORT"),
        ("vsock://2", "vsock://CID:PORT"),
        ("vsock://x:1", "CID 'x' is not a number"),
        ("vsock://2:-1", "not a number"),
        ("vsock://2:4294967296", "out of range"),
        ("unix:", "missing socket path"),
        ("unix://relative", "absolute path"),
        ("unix:/" + "x" * 200, "longer than"),
        ("tcp://localhost", "expected tcp://host:port"),
        ("tcp://:80", "expected tcp://host:port"),
        ("tcp://h:0", "out of range"),
        ("tcp://h:70000", "out of range"),
        ("tcp://h:http", "not a number"),
        ("tcp://::1:80", "brackets"),
        ("tcp://[::1", "unterminated"),
        ("tcp://[::1]", "missing port"),
        ("tcp:h:1", "tcp://host:port"),
    ],
)
def test_bad_addresses(text, fragment):
    with pytest.raises(AddressError) as info:
        parse_address(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_unix_connect(tmp_path):
    path = test_agent_peer.short_socket_path(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        sock = parse_address("unix:" + path).connect(timeout=2)
        with sock:
            conn, _ = server.accept()
            conn.close()
            assert sock.gettimeout() is None


def test_unix_connect_refused(tmp_path):
    with pytest.raises(OSError):
        parse_address("unix:" + str(tmp_path / "none.sock")).connect(timeout=1)


def test_tcp_connect():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with parse_address(f"tcp://127.0.0.1:{port}").connect(timeout=2) as sock:
            conn, _ = server.accept()
            conn.close()
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
