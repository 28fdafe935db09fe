"""Seed corpus of valid, truncated and mutated BLIN byte streams (shared by the
sanitizer test and the fuzzers)."""

import random
import struct

H = struct.Struct("<IBBHIQ")
TYPES = [0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x20, 0x21, 0x30, 0x31]


def frame(t, payload=b"", rid=1, flags=0, magic=0x424C494E, version=1, length=None):
    return H.pack(magic, version, t, flags, len(payload) if length is None else length, rid) + payload


def seeds(n: int = 400, seed: int = 1):
    rnd = random.Random(seed)
    out = [b"", frame(1, rid=1), frame(1, b'{"session":"a","token":"t"}'),
           frame(0x10, b'{"method":"vhub.ping"}', rid=2), frame(2), frame(2, b"pong"),
           frame(0x30, length=2**32 - 1), frame(0x30, b"x", magic=0), frame(0x30, version=2),
           frame(0x42), b"GET / HTTP/1.1\r\n\r\n"]
    for _ in range(n):
        s = bytearray(b"".join(frame(rnd.choice(TYPES), rnd.randbytes(rnd.randrange(0, 64)),
                                     rnd.getrandbits(64), rnd.getrandbits(16))
                               for _ in range(rnd.randrange(1, 8))))
        kind = rnd.randrange(4)
        if kind == 1 and s:
            s = s[: rnd.randrange(len(s))]  # truncated
        elif kind == 2:
            for _ in range(rnd.randrange(1, 5)):  # mutated
                s[rnd.randrange(len(s))] = rnd.randrange(256)
        elif kind == 3:
            s[8:12] = struct.pack("<I", rnd.getrandbits(32))  # lying length
        out.append(bytes(s))
    # runs of RpcRequests for the methods csrc/fuzz_blin.c teaches the RPC hot loop
    rpc = random.Random(seed + 1)
    bodies = [b'{"method":"%s"}', b'{"method":"%s","params":{"i":[1,2.5,null,true,"s\\n"]}}',
              b' {"params":{}, "method" : "%s"} ', b'{"method":"%s","n":1e3}', b'{"method":"%s","method":"a"}']
    for _ in range(n // 4):
        s = bytearray(b"".join(frame(0x10, rpc.choice(bodies) % rpc.choice([b"a", b"tool.run", b"x.y", b"m", b"zz"]),
                                     rpc.choice([0, 1, rpc.getrandbits(64)]))
                               for _ in range(rpc.randrange(1, 6))))
        if rpc.random() < 0.3:
            s = s[: rpc.randrange(len(s))]
        elif rpc.random() < 0.3:
            s[rpc.randrange(len(s))] = rpc.randrange(256)
        out.append(bytes(s))
    return out
