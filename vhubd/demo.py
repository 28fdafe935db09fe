"""The README's main job. Until the daemon lands this shows the codec only."""

from . import codec
from .protocol import Connection, Side, encode_frame


def main() -> None:
    print(f"codec backend: {codec.BACKEND} ({codec.REASON})")
    conn = Connection(Side.SERVER)
    hs = encode_frame(1, 1, b"")
    ev = conn.receive_data(hs + encode_frame(0x30, 1, b"hello from a guest\n"))
    print("received:", ev)
    conn.accept(request_id=1)
    print("events after accept:", conn.resume())
    print("reply bytes:", conn.data_to_send())


if __name__ == "__main__":
    main()
