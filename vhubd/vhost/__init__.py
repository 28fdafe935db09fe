"""vhubd as a VM's virtio-vsock device, served over vhost-user (DESIGN §5).

QEMU's ``vhost-user-vsock-device`` hands the guest's vsock virtqueues to a
userspace backend over a Unix socket. This package is that backend, in layers:

- ``vsock``: the virtio-vsock packet header, the per-connection state machine
  and credit accounting. Sans-I/O: packets in, events and packets out.
- ``virtq``: guest memory (the regions QEMU shares) and split virtqueues:
  reading the avail ring, walking descriptor chains, writing the used ring.
- ``vhost_user``: the vhost-user message codec and the backend's side of the
  protocol (features, memory table, vring setup, config space).
- ``device``: the three joined into one vsock device, still without I/O.
- ``service``: the thin I/O layer: the vhost-user socket and kick eventfds on
  the event loop, and an ``asyncio.Transport`` per guest connection so the
  daemon's ordinary ``server.Peer`` serves it, no socket in between.
"""
