"""The vsock device on an event loop (vhubd.vhost.service + device), driven by
a fake QEMU and guest driver over a real socketpair, memfd and eventfds:
vhost-user set-up, guest connections as asyncio transports, flow control
both ways, shutdown/reset, QEMU going away; and a guest BLIN handshake
landing in the daemon's relay through the ordinary server.Peer, no token."""

import asyncio
import os
import socket

import uvloop
from vhost_fake import FakeFrontEnd

from vhubd.vhost.service import VhostUserVsockService
from vhubd.vhost.vsock import HEADER_SIZE, SHUTDOWN_BOTH, Op


class Echo(asyncio.BufferedProtocol):
    """Echoes, records, and pauses on demand."""

    def __init__(self, log):
        self.log = log
        self.buf = bytearray(1000)
        self.data = bytearray()
        self.lost = None
        self.eof = False
        self.paused_writing = 0
        self.resumed_writing = 0
        self.echo = True
        log.append(self)

    def connection_made(self, transport):
        self.t = transport

    def get_buffer(self, hint):
        return memoryview(self.buf)

    def buffer_updated(self, n):
        chunk = bytes(self.buf[:n])
        self.data += chunk
        if self.echo:
            self.t.write(chunk.upper())

    def eof_received(self):
        self.eof = True
        return False

    def pause_writing(self):
        self.paused_writing += 1

    def resume_writing(self):
        self.resumed_writing += 1

    def connection_lost(self, exc):
        self.lost = exc if exc is not None else "clean"


async def until(pred, timeout=5.0, what="condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def started(protocol_factory=None, buf_alloc=None):
    ours, theirs = socket.socketpair()
    protos = []
    svc = VhostUserVsockService(ours, guest_cid=3, protocol_factory=protocol_factory or (lambda: Echo(protos)),
                                label="test", buf_alloc=buf_alloc)
    svc.start()
    fe = FakeFrontEnd(theirs)
    info = await asyncio.get_running_loop().run_in_executor(None, fe.setup)
    await until(lambda: svc.ready, what="rings started")
    fe.post_rx()
    return svc, fe, protos, info


def run(coro):
    return uvloop.run(coro)


def test_setup_connect_and_echo():
    async def main():
        svc, fe, protos, info = await started()
        assert info["config"][12:] == (3).to_bytes(8, "little")
        fe.send_packet(Op.REQUEST, 1234)
        await until(lambda: protos, what="connection")
        p = protos[0]
        assert p.t.get_extra_info("peername") == (3, 1234)
        fe.send_packet(Op.RW, 1234, b"hello vsock")
        got = []
        await until(lambda: got.extend(fe.received()) or any(h.op == Op.RW for h, _ in got), what="echo")
        assert [h.op for h, _ in got] == [Op.RESPONSE, Op.RW]
        assert got[1][1] == b"HELLO VSOCK" and bytes(p.data) == b"hello vsock"
        assert fe.reap_tx() == 2
        # the other ports are refused
        fe.send_packet(Op.REQUEST, 99, dst_port=22)
        await until(lambda: got.extend(fe.received()) or got[-1][0].op == Op.RST, what="rst")
        assert len(protos) == 1
        svc.close("test over")
        fe.close()
    run(main())


def test_big_transfer_guest_to_host_respects_credit_and_pause():
    async def main():
        svc, fe, protos, _ = await started(buf_alloc=64 * 1024)
        fe.send_packet(Op.REQUEST, 7)
        await until(lambda: protos)
        p = protos[0]
        p.echo = False
        p.t.pause_reading()
        sent = 0
        payload = bytes(range(256)) * 16  # 4 KiB packets
        credit_updates = []
        while sent < 64 * 1024:
            fe.send_packet(Op.RW, 7, payload)
            sent += len(payload)
        await until(lambda: fe.reap_tx() == 0 and not svc.device.queue(1).available(), what="tx drained")
        await asyncio.sleep(0.05)
        assert len(p.data) == 0  # paused: nothing delivered, nothing consumed
        credit_updates += [h for h, _ in fe.received() if h.op == Op.CREDIT_UPDATE]
        assert credit_updates == []
        p.t.resume_reading()
        await until(lambda: len(p.data) == 64 * 1024, what="pending delivered")
        await until(lambda: any(h.op == Op.CREDIT_UPDATE for h, _ in fe.received()), what="credit update")
        assert p.data == payload * 16
        fe.send_packet(Op.RW, 7, b"x" * 100, fwd_cnt=0)  # the credit came back: more is welcome
        await until(lambda: len(p.data) == 64 * 1024 + 100)
        svc.close("done")
        fe.close()
    run(main())


def test_host_to_guest_write_backpressure_follows_guest_credit():
    async def main():
        svc, fe, protos, _ = await started()
        fe.send_packet(Op.REQUEST, 8, buf_alloc=32 * 1024)
        await until(lambda: protos)
        p = protos[0]
        p.t.set_write_buffer_limits(high=100_000)
        blob = os.urandom(300_000)
        p.t.write(blob)
        assert p.paused_writing == 1
        got = bytearray()
        consumed = 0
        for _ in range(2000):
            for h, data in fe.received():
                if h.op == Op.RW:
                    got += data
            fe.post_rx(len(fe.queues[0].free) // 2)
            if len(got) > consumed:  # the guest application read it: tell the device
                consumed = len(got)
                fe.send_packet(Op.CREDIT_UPDATE, 8, buf_alloc=32 * 1024, fwd_cnt=consumed)
            if len(got) == len(blob):
                break
            await asyncio.sleep(0.002)
            assert len(got) - consumed <= 32 * 1024
        assert bytes(got) == blob
        assert p.resumed_writing == 1
        svc.close("done")
        fe.close()
    run(main())


def test_guest_shutdown_gives_eof_then_rst():
    async def main():
        svc, fe, protos, _ = await started()
        fe.send_packet(Op.REQUEST, 9)
        await until(lambda: protos)
        p = protos[0]
        fe.send_packet(Op.RW, 9, b"last words")
        fe.send_packet(Op.SHUTDOWN, 9, flags=SHUTDOWN_BOTH)
        await until(lambda: p.lost is not None, what="connection lost")
        assert p.eof and p.lost == "clean" and bytes(p.data) == b"last words"
        got = []
        await until(lambda: got.extend(fe.received()) or (got and got[-1][0].op == Op.RST), what="rst")
        assert svc.transports == set()
        svc.close("done")
        fe.close()
    run(main())


def test_host_close_sends_shutdown_and_waits_for_rst():
    async def main():
        svc, fe, protos, _ = await started()
        fe.send_packet(Op.REQUEST, 10)
        await until(lambda: protos)
        p = protos[0]
        p.t.write(b"bye")
        p.t.close()
        got = []
        await until(lambda: got.extend(fe.received()) or (got and got[-1][0].op == Op.SHUTDOWN))
        assert [h.op for h, _ in got] == [Op.RESPONSE, Op.RW, Op.SHUTDOWN] and got[1][1] == b"bye"
        assert p.lost is None
        fe.send_packet(Op.RST, 10)
        await until(lambda: p.lost is not None)
        assert p.lost == "clean"
        svc.close("done")
        fe.close()
    run(main())


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_qemu_disconnect_frees_everything():
    async def main():
        base = _fd_count()
        svc, fe, protos, _ = await started()
        fe.send_packet(Op.REQUEST, 11)
        fe.send_packet(Op.REQUEST, 12)
        await until(lambda: len(protos) == 2)
        fe.close()  # QEMU dies: socket, eventfds, memfd all closed on its side
        reason = await asyncio.wait_for(svc.done, 5)
        assert "closed the vhost-user connection" in reason
        assert all(isinstance(p.lost, ConnectionResetError) for p in protos)
        assert svc.device.backend.mem is None and svc.transports == set()
        assert _fd_count() <= base  # kick/call eventfds, the socket: nothing left open
    run(main())


def test_bad_front_end_is_dropped():
    async def main():
        ours, theirs = socket.socketpair()
        svc = VhostUserVsockService(ours, guest_cid=3, protocol_factory=asyncio.Protocol, label="bad")
        svc.start()
        theirs.sendall(b"\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00")  # version 2
        reason = await asyncio.wait_for(svc.done, 5)
        assert "version 2" in reason
        assert theirs.recv(10) == b""
        theirs.close()
    run(main())


def test_guest_handshake_lands_in_the_relay_with_a_fixed_session():
    """The daemon's own Peer over a vsock transport: the session comes from the
    device, the payload's session and token are not needed (or trusted)."""
    from vhubd import frames
    from vhubd.daemon import DaemonConfig
    from vhubd.protocol import encode_frame
    from vhubd.relay import Relay
    from vhubd.server import Server
    from vhubd.sessions import SessionRegistry

    async def main():
        loop = asyncio.get_running_loop()
        cfg = DaemonConfig()
        relay = Relay(cfg.relay_config(), SessionRegistry(), loop.call_later)
        server = Server(cfg, relay, loop)
        relay.registry.create("vm1", "qemu")
        svc, fe, _, _ = await started(protocol_factory=server.guest_protocol("qemu-vm1", "vm1"))
        fe.send_packet(Op.REQUEST, 2000)
        hs = encode_frame(frames.MsgType.HANDSHAKE, 1, b'{"session": "someone-else", "token": "", "agent": "t"}')
        fe.send_packet(Op.RW, 2000, hs)
        got = bytearray()

        def arrived():
            for _, data in fe.received():
                got.extend(data)
            return frames.READY_PAYLOAD in got
        await until(arrived, what="handshake answer")
        sess = relay.registry.get("vm1")
        assert sess.agent is not None and sess.state.value == "ready"
        assert sess.agent.label == "qemu-vm1:3:2000" and sess.agent_info["agent"] == "t"
        assert relay.registry.get("someone-else") is None
        fe.send_packet(Op.RST, 2000)
        await until(lambda: sess.agent is None, what="agent lost")
        assert sess.state.value == "agent_lost"
        svc.close("done")
        fe.close()
        assert HEADER_SIZE == 44
    run(main())
