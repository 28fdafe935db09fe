"""Every frame the host side sends is built here (the daemon, the client
library and the tests alike); payloads are JSON through msgspec."""

from __future__ import annotations

import msgspec

from .._codec_py import pack_header
from ..frames import HEADER, MAGIC, MAX_U64, PONG_PAYLOAD, VERSION, MsgType

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode
_pack = HEADER.pack

HB = int(MsgType.HEARTBEAT)
ER = int(MsgType.ERROR)
RQ = int(MsgType.RPC_REQUEST)
RS = int(MsgType.RPC_RESPONSE)
RE = int(MsgType.RPC_ERROR)


def encode_frame(msg_type: int, request_id: int, payload=b"", flags: int = 0) -> bytes:
    """Header + payload as one bytes object (for small frames). The header is
    packed with struct whatever the codec backend: for one 20-byte header a
    cffi call costs more than the work (bench/RESULTS.md, "pack")."""
    return pack_header(msg_type, request_id, len(payload), flags) + bytes(payload)


def error_payload(code: str, message: str) -> bytes:
    return _json_encode({"code": code, "message": message})


def rpc_request(request_id: int, method: str, params=None, **extra) -> bytes:
    """An RpcRequest (request_id 0: a notification); ``extra`` keys go beside method/params."""
    body = {"method": method, "params": {} if params is None else params, **extra}
    return encode_frame(RQ, request_id, _json_encode(body))


def rpc_result(request_id: int, result) -> bytes:
    """The answer a handler sends for every request it serves: packed here
    without encode_frame's layers (the client library's hot path)."""
    body = _json_encode(result)
    if type(request_id) is int and 0 <= request_id <= MAX_U64:
        return _pack(MAGIC, VERSION, RS, 0, len(body), request_id) + body
    return encode_frame(RS, request_id, body)  # raises what a bad id raises


def rpc_error(request_id: int, code: str, message: str) -> bytes:
    return encode_frame(RE, request_id, error_payload(code, message))


def notification(method: str, params) -> bytes:
    """An RpcRequest with request_id 0: no answer expected."""
    return encode_frame(RQ, 0, _json_encode({"method": method, "params": params}))


def error_frame(code: str, message: str, request_id: int = 0) -> bytes:
    """An Error frame: sent right before a connection is closed."""
    return encode_frame(ER, request_id, error_payload(code, message))


def heartbeat(request_id: int, pong: bool = False) -> bytes:
    return encode_frame(HB, request_id, PONG_PAYLOAD if pong else b"")


def parse_error_payload(payload) -> tuple[str, str]:
    """(code, message) of an Error/RpcError payload, tolerant of junk."""
    try:
        obj = _json_decode(payload)
        if isinstance(obj, dict):
            return str(obj.get("code", "error")), str(obj.get("message", ""))
    except msgspec.DecodeError:
        pass
    return "error", bytes(payload[:200]).decode("utf-8", "replace")
