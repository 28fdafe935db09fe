"""Protocol fuzzing through the live listeners (guest Unix socket, loopback
TCP, control socket): a seeded generator of valid prefixes then garbage,
random types, lying lengths, bit flips, 4 GiB lengths, split writes and
half-closes, while a healthy guest streams to a subscriber beside it. Every
connection must end as the wire rules say (its Error and a close within its
timeout, or still open when what it sent was valid); the healthy stream loses
no byte; nothing leaks. The full-size run is ``python tests/reliability.py``."""

from __future__ import annotations

import reliability


def test_protocol_fuzz_through_live_listeners(tmp_path):
    res = reliability.run_campaign(tmp_path, ["protocol_fuzz"], reliability.QUICK)
    assert not res["failures"], "\n".join(res["failures"][:10])
    fz = res["scenarios"]["protocol_fuzz"]
    assert fz["cases"] == reliability.QUICK["fuzz_cases"] and fz["failed"] == 0
    outcomes = fz["outcomes"]
    # the generator reaches every kind of ending
    assert outcomes.get("open") and outcomes.get("bad_magic") and outcomes.get("stalled")
    assert outcomes.get("frame_too_large") and outcomes.get("unknown_type")
    healthy = res["summary"]["healthy"]
    assert healthy["lossless"] and healthy["sent_bytes"] > 0


def test_model_of_what_the_daemon_must_answer():
    """The oracle the fuzzer checks the daemon against."""
    frm, hdr, T = reliability.frm, reliability.hdr, reliability.T
    hs = frm(T.HANDSHAKE, 1, b"")
    assert reliability.model(b"GET / HTTP/1.1\r\n", False) == ("violation", "bad_magic")
    assert reliability.model(hs + hdr(T.STDOUT, 0xFFFFFFFF), True) == ("violation", "frame_too_large")
    assert reliability.model(hs + hdr(0x7F, 0), True) == ("violation", "unknown_type")
    assert reliability.model(frm(T.STDOUT, 1, b"x"), True) == ("violation", "handshake_required")
    assert reliability.model(hs + hdr(T.STDOUT, 10) + b"abc", True) == ("mid_frame", True)
    assert reliability.model(hs[:7], True) == ("mid_frame", False)
    assert reliability.model(hs + frm(T.STDOUT, 1, b"x"), True) == ("clean",)
    assert reliability.model(hs, False) == ("refusal",)
    assert reliability.model(hs + frm(T.ERROR, 0, b"{}"), True) == ("peer_error",)
