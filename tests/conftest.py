"""Shared fixtures: every codec test runs on every backend built here."""

import os

import pytest

from vhubd import codec

BACKENDS = codec.backends()


def pytest_report_header(config):
    return f"vhubd codec: default backend {codec.BACKEND} ({codec.REASON}); built: {sorted(BACKENDS)}"


def pytest_sessionstart(session):
    if os.environ.get("VHUBD_REQUIRE_C") == "1" and "c" not in BACKENDS:
        raise pytest.UsageError("VHUBD_REQUIRE_C=1 but the C codec is not built")


@pytest.fixture(params=["c", "python"])
def codec_impl(request):
    impl = BACKENDS.get(request.param)
    if impl is None:
        pytest.skip("C codec not built on this host")
    return impl


@pytest.fixture
def make_daemon(tmp_path):
    from harness import Daemon

    started = []

    def make(*args, **kw):
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, *args, **kw).start()
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


@pytest.fixture
def api_daemon(make_daemon):
    """A local-backend daemon with the HTTP API on a free loopback port."""
    return make_daemon("--backend", "local", "--http", "127.0.0.1:0", "--heartbeat", "0")
