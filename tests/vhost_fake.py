"""A fake vhost-user front-end and guest for the vhost tests: what QEMU and a
guest kernel's virtio-vsock driver do, in-process, over a real memfd, real
eventfds and a real socketpair (so SCM_RIGHTS, mmap and kicks are real)."""

from __future__ import annotations

import array
import mmap
import os
import socket
import struct

from vhubd.vhost.vhost_user import FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION, HEADER, Request
from vhubd.vhost.virtq import DriverQueue, GuestMemory
from vhubd.vhost.vsock import HEADER_SIZE, HOST_CID, TYPE_STREAM, Op, pack_header, parse_header

GPA = 0x0
UVA = 0x7F00_0000_0000  # a made-up QEMU address: the backend must translate ring addresses with it
MEM_SIZE = 8 << 20
QUEUE_AREA = 1 << 20  # per queue: rings, then buffers
BUF = 4096 + HEADER_SIZE  # Linux posts 4 KiB rx buffers (+ header)


class FakeFrontEnd:
    """QEMU's side of vhost-user for a vsock device, and the guest's driver."""

    def __init__(self, sock: socket.socket, num: int = 64, guest_cid: int = 3):
        self.sock = sock
        self.num = num
        self.guest_cid = guest_cid
        self.memfd = os.memfd_create("fake-guest-ram")
        os.ftruncate(self.memfd, MEM_SIZE)
        self.map = mmap.mmap(self.memfd, MEM_SIZE)
        self.mem = GuestMemory.from_buffers([(GPA, UVA, self.map)])
        self.kick = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.call = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.queues: list[DriverQueue] = []
        for q in range(2):
            base = GPA + QUEUE_AREA * (q + 1)
            self.queues.append(DriverQueue(self.mem, num, base, base + 16 * num, base + 0x4000, base + 0x8000, BUF))
        self.next_port = 40000

    # -- vhost-user messages --
    def send(self, req: int, payload: bytes = b"", fds=(), need_reply: bool = False) -> None:
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(req, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def recv(self) -> tuple[int, int, bytes]:
        head = _recv_exact(self.sock, HEADER.size)
        req, flags, size = HEADER.unpack(head)
        assert flags & FLAG_REPLY
        return req, flags, _recv_exact(self.sock, size)

    def call_msg(self, req: int, payload: bytes = b"", fds=()) -> bytes:
        self.send(req, payload, fds)
        r, _, body = self.recv()
        assert r == req
        return body

    def setup(self, *, enable: bool = True) -> dict:
        """What QEMU 7.2 sends for vhost-user-vsock, realize then start."""
        features = struct.unpack("<Q", self.call_msg(Request.GET_FEATURES))[0]
        proto = struct.unpack("<Q", self.call_msg(Request.GET_PROTOCOL_FEATURES))[0]
        self.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", proto))
        self.send(Request.SET_OWNER)
        cfg = self.call_msg(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))
        self.send(Request.SET_FEATURES, struct.pack("<Q", features), need_reply=False)
        region = struct.pack("<QQQQ", GPA, MEM_SIZE, UVA, 0)
        self.send(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, [self.memfd], need_reply=True)
        ack = self.recv()
        for q in range(2):
            base = GPA + QUEUE_AREA * (q + 1)
            self.send(Request.SET_VRING_NUM, struct.pack("<II", q, self.num))
            self.send(Request.SET_VRING_BASE, struct.pack("<II", q, 0))
            self.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", q, 0, UVA + base, UVA + base + 0x4000,
                                                          UVA + base + 16 * self.num, 0))
            self.send(Request.SET_VRING_KICK, struct.pack("<Q", q), [self.kick[q]])
            self.send(Request.SET_VRING_CALL, struct.pack("<Q", q), [self.call[q]])
            if enable:
                self.send(Request.SET_VRING_ENABLE, struct.pack("<II", q, 1))
        return {"features": features, "protocol_features": proto, "config": cfg, "ack": ack}

    # -- the guest driver --
    def post_rx(self, n: int | None = None) -> None:
        q = self.queues[0]
        for _ in range(n if n is not None else len(q.free) // 2):
            q.add(writable=[HEADER_SIZE, 4096])  # header and payload in two descriptors, as Linux 6.1
        self.kick_queue(0)

    def kick_queue(self, q: int) -> None:
        os.eventfd_write(self.kick[q], 1)

    def send_packet(self, op: int, src_port: int, payload: bytes = b"", *, dst_port: int = 10000, flags: int = 0,
                    buf_alloc: int = 256 * 1024, fwd_cnt: int = 0, kick: bool = True) -> None:
        h = pack_header(self.guest_cid, HOST_CID, src_port, dst_port, len(payload), TYPE_STREAM, op, flags,
                        buf_alloc, fwd_cnt)
        self.queues[1].add(readable=[h, payload] if payload else [h])
        if kick:
            self.kick_queue(1)

    def reap_tx(self) -> int:
        return len(self.queues[1].take_used())

    def received(self) -> list[tuple]:
        """Packets the device put in our rx buffers: (header, payload)."""
        out = []
        for _, _, data in self.queues[0].take_used():
            h = parse_header(data)
            out.append((h, data[HEADER_SIZE:HEADER_SIZE + h.len]))
        return out

    def close(self) -> None:
        for fd in self.kick + self.call + [self.memfd]:
            try:
                os.close(fd)
            except OSError:
                pass
        for q in self.queues:
            q.release()
        self.mem.close()
        self.map.close()
        self.sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the back-end closed the vhost-user socket")
        buf += chunk
    return buf


__all__ = ["FakeFrontEnd", "GPA", "UVA", "MEM_SIZE", "Op", "HEADER_SIZE"]
