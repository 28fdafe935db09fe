"""A first end-to-end check: Blink agent bytes against a real daemon."""

import struct

from harness import RawGuest

from vhubd.frames import MsgType


def test_blink_agent_handshake_and_ping(daemon):
    g = RawGuest(daemon.socket)
    g.send_raw(struct.pack("<IBBHIQ", 0x424C494E, 1, 0x01, 0, 0, 1))
    f = g.next_event()
    assert bytes(f.payload) == b"blink-vhub-ready" and f.request_id == 1
    g.send(MsgType.RPC_REQUEST, 9, {"method": "vhub.ping"})
    r = g.next_frame()
    assert r.msg_type == MsgType.RPC_RESPONSE and r.request_id == 9
    g.close()
    out = daemon.cli("sessions", "--json")
    assert out.returncode == 0, out.stderr
