"""A virtio-vsock device served over vhost-user, still without I/O.

Joins the three layers: the vhost-user back-end (``vhost_user``) configures
guest memory and the vrings, the split queues (``virtq``) carry packets, and
the vsock logic (``vsock``) decides what they mean. The I/O layer
(``service``) calls ``handle_message`` for every vhost-user message,
``process_tx`` when the guest kicks its tx queue, ``fill_rx`` when there is
something to send or the guest posted receive buffers, and signals the call
eventfds when these return True.

Queues (virtio spec): 0 = rx (device -> guest), 1 = tx (guest -> device),
2 = event. QEMU's vhost-user-vsock keeps the event queue to itself and hands
us only rx and tx; we never post events.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from .vhost_user import Listener, Message, ProtocolFeature, VhostUserBackend
from .virtq import SplitQueue, VirtqError
from .vsock import DEFAULT_BUF_ALLOC, HEADER_SIZE, PacketError, VsockConnection, VsockDevice, parse_header

log = logging.getLogger("vhubd")

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
NUM_QUEUES = 3
PROTOCOL_FEATURES = ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.RESET_DEVICE
TX_BATCH = 256  # chains per process_tx call, so one busy guest cannot starve the event loop


class VsockVhostDevice(Listener):
    """One guest's vsock device: vhost-user configuration + virtqueues +
    the vsock connection logic."""

    def __init__(self, guest_cid: int, ports=(10000,), *, buf_alloc: int = DEFAULT_BUF_ALLOC):
        self.guest_cid = guest_cid
        self.vsock = VsockDevice(guest_cid, ports, buf_alloc=buf_alloc)
        self.backend = VhostUserBackend(device_features=0, protocol_features=int(PROTOCOL_FEATURES),
                                        config=struct.pack("<Q", guest_cid), num_queues=NUM_QUEUES,
                                        listener=self)
        self.lost: list[VsockConnection] = []
        self.lost_reason = ""
        self.vrings_dirty = False
        self.bad_chains = 0

    # -- vhost-user --
    def handle_message(self, msg: Message) -> bytes | None:
        return self.backend.handle(msg)

    def vrings_changed(self) -> None:
        self.vrings_dirty = True

    def device_reset(self, reason: str) -> None:
        self.lost.extend(self.vsock.reset())
        self.lost_reason = reason

    def take_lost(self) -> tuple[list[VsockConnection], str]:
        lost, self.lost = self.lost, []
        return lost, self.lost_reason

    def queue(self, index: int) -> SplitQueue | None:
        v = self.backend.vrings[index]
        return v.queue if v.running else None

    # -- the data path --
    def process_tx(self, on_events: Callable[[list], None]) -> tuple[bool, bool]:
        """Take the guest's packets off the tx queue; ``on_events`` gets each
        packet's events while its buffer is still ours (Data may point into
        guest memory). Returns (notify the guest, more chains may be waiting)."""
        q = self.queue(TX_QUEUE)
        if q is None:
            return False, False
        vsock = self.vsock
        done = 0
        while done < TX_BATCH:
            chain = q.pop()
            if chain is None:
                break
            try:
                r = chain.readable
                if len(r) == 2 and len(r[0]) == HEADER_SIZE:
                    head, rest = r[0], r[1]  # Linux: header and payload in two descriptors, no copy
                else:
                    data = chain.read_all()
                    head, rest = data[:HEADER_SIZE], data[HEADER_SIZE:]
                h = parse_header(head)
                if len(rest) > h.len:
                    rest = rest[:h.len]
                events = vsock.receive(h, rest)
                if events:
                    on_events(events)
            except PacketError as exc:
                self.bad_chains += 1
                log.warning("vsock cid=%d: dropped a bad tx packet: %s", self.guest_cid, exc)
            finally:
                q.push(chain.head, 0)
            done += 1
        return done > 0 and q.needs_notify(), done >= TX_BATCH

    def fill_rx(self) -> bool:
        """Put pending packets into the guest's rx buffers; True if the guest
        should be notified."""
        q = self.queue(RX_QUEUE)
        if q is None:
            return False
        vsock = self.vsock
        pushed = 0
        while vsock.has_output():
            chain = q.pop()
            if chain is None:
                break  # the guest has no free buffer: it kicks rx when it posts more
            room = chain.writable_len
            if room < HEADER_SIZE:
                self.bad_chains += 1
                q.push(chain.head, 0)
                pushed += 1
                continue
            pkt = vsock.next_packet(room)
            if pkt is None:
                q.unpop()
                break
            header, pieces = pkt
            try:
                n = chain.write([header, *pieces])
            except VirtqError as exc:  # cannot happen with a sane guest: next_packet respected room
                log.warning("vsock cid=%d: rx buffer: %s", self.guest_cid, exc)
                n = 0
            q.push(chain.head, n)
            pushed += 1
        return pushed > 0 and q.needs_notify()

    def close(self) -> list[VsockConnection]:
        """The vhost-user connection is gone: every connection with it."""
        self.device_reset("the VMM disconnected")
        self.backend.close()
        return self.take_lost()[0]
