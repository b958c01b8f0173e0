"""A minimal ONNX ModelProto writer (protobuf wire format), enough for a one-node model.

Writing the few fields by hand keeps the `onnx` and `protobuf` packages off the offline
GPU machine; tests check the bytes against `onnx` where it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

ELEM_TYPES = {"f32": 1, "f16": 10}  # TensorProto.FLOAT, TensorProto.FLOAT16
ATTR_INT = 2  # AttributeProto.INT
IR_VERSION = 10  # accepted by onnxruntime 1.2x (onnx 1.23 writes 14, which ORT 1.27 rejects)


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    """A varint field."""
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, payload: bytes) -> bytes:
    """A length-delimited field (string, bytes or embedded message)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    """A string field."""
    return _bytes(field, text.encode())


def value_info(name: str, dtype: str, shape: Sequence[int]) -> bytes:
    """ValueInfoProto of a tensor with a static shape."""
    dims = b"".join(_bytes(1, _int(1, d)) for d in shape)
    tensor = _int(1, ELEM_TYPES[dtype]) + _bytes(2, dims)
    return _str(1, name) + _bytes(2, _bytes(1, tensor))


def node(
    op_type: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    domain: str = "",
    name: str = "",
    ints: dict[str, int] | None = None,
) -> bytes:
    """NodeProto with int attributes."""
    out = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    out += _str(3, name or op_type) + _str(4, op_type)
    for key, value in sorted((ints or {}).items()):
        out += _bytes(5, _str(1, key) + _int(3, value) + _int(20, ATTR_INT))
    return out + (_str(7, domain) if domain else b"")


def model(
    nodes: Sequence[bytes],
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    opsets: dict[str, int],
    *,
    graph_name: str = "graph",
    producer: str = "attnc.bench",
) -> bytes:
    """Serialized ModelProto of one graph."""
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, graph_name)
    graph += b"".join(_bytes(11, i) for i in inputs) + b"".join(_bytes(12, o) for o in outputs)
    out = _int(1, IR_VERSION) + _str(2, producer)
    out += _bytes(7, graph)
    for domain, version in sorted(opsets.items()):
        out += _bytes(8, _str(1, domain) + _int(2, version) if domain else _int(2, version))
    return out


def mha_model(B: int, S: int, T: int, H: int, D: int, Dv: int, *, causal: bool, dtype: str = "f32") -> bytes:
    """com.microsoft MultiHeadAttention: q [B,S,H*D] (BSD), k/v [B,H,T,D|Dv] (BNSH), o BSD."""
    ints = {"num_heads": H} | ({"unidirectional": 1} if causal else {})
    mha = node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", ints=ints)
    inputs = [
        value_info("q", dtype, [B, S, H * D]),
        value_info("k", dtype, [B, H, T, D]),
        value_info("v", dtype, [B, H, T, Dv]),
    ]
    outputs = [value_info("o", dtype, [B, S, H * Dv])]
    return model([mha], inputs, outputs, {"": 17, "com.microsoft": 1}, graph_name="mha")
