"""Model weights as bytes: a magic header, a JSON header and raw little-endian float64 arrays. No pickle.

Layout::

    MAGIC (8 bytes) | header length (uint32, little-endian) | header (UTF-8 JSON) | payload

The header holds the format version, the architecture, the model version, the dtype, every array's shape and a
SHA-256 digest over the header (without the digest itself, in canonical JSON) and the payload, so flipping any
byte, truncating the blob or editing a shape is caught by `loads`.

>>> import numpy as np
>>> blob = dumps([np.eye(2), np.zeros(3)], {"architecture": "dense_ae", "model_version": 4})
>>> weights, meta = loads(blob)
>>> [w.shape for w in weights], meta["model_version"]
([(2, 2), (3,)], 4)
>>> loads(from_b64(to_b64(blob)))[0][0].tolist()
[[1.0, 0.0], [0.0, 1.0]]
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from typing import Any, Sequence

import numpy as np

MAGIC = b"FLEADW\x00\x01"
FORMAT_VERSION = 1
DTYPE = "<f8"  # every array travels as little-endian float64: exact for weights and for counters below 2**53
_LENGTH = struct.Struct("<I")


class SerializationError(ValueError):
    """A blob that is not a valid FLEAD weight blob (truncated, tampered, wrong magic or wrong shapes)."""


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _digest(header: dict, payload: bytes) -> str:
    unsigned = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(_canonical(unsigned) + payload).hexdigest()


def dumps(weights: Sequence[np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    """Serialise `weights` (cast to float64) with a JSON-serialisable `meta` dict.

    `meta["architecture"]` and `meta["model_version"]`, when present, are also copied to the header's top level.
    """
    meta = dict(meta or {})
    arrays = [np.require(np.asarray(w, dtype=DTYPE), requirements="C") for w in weights]
    payload = b"".join(a.tobytes() for a in arrays)
    header = {
        "format_version": FORMAT_VERSION,
        "architecture": meta.get("architecture"),
        "model_version": meta.get("model_version"),
        "dtype": DTYPE,
        "shapes": [list(a.shape) for a in arrays],
        "meta": meta,
    }
    header["sha256"] = _digest(header, payload)
    header_bytes = _canonical(header)
    return MAGIC + _LENGTH.pack(len(header_bytes)) + header_bytes + payload


def loads(blob: bytes, expected_shapes: Sequence[Sequence[int]] | None = None) -> tuple[list[np.ndarray], dict]:
    """Parse a blob from `dumps`; check magic, digest and (if given) `expected_shapes`. Returns (weights, meta)."""
    blob = bytes(blob)
    if len(blob) < len(MAGIC) + _LENGTH.size:
        raise SerializationError(f"truncated: {len(blob)} bytes is shorter than the fixed header")
    if blob[:len(MAGIC)] != MAGIC:
        raise SerializationError(f"wrong magic {blob[:len(MAGIC)]!r}: not a FLEAD weight blob")
    (header_len,) = _LENGTH.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if len(blob) < start + header_len:
        raise SerializationError(f"truncated: header of {header_len} bytes announced, {len(blob) - start} present")
    try:
        header = json.loads(blob[start:start + header_len].decode("utf-8"))
        shapes = [tuple(int(n) for n in shape) for shape in header["shapes"]]
        version, dtype, digest = header["format_version"], header["dtype"], header["sha256"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise SerializationError(f"corrupt header: {exc}") from None
    if version != FORMAT_VERSION or dtype != DTYPE:
        raise SerializationError(f"unsupported format {version} / dtype {dtype} (this reader: {FORMAT_VERSION}, {DTYPE})")
    payload = blob[start + header_len:]
    sizes = [int(np.prod(shape, dtype=np.int64)) * 8 for shape in shapes]
    if len(payload) != sum(sizes):
        raise SerializationError(f"payload is {len(payload)} bytes, shapes {shapes} need {sum(sizes)}: truncated?")
    if _digest(header, payload) != digest:
        raise SerializationError("SHA-256 mismatch: the blob was altered or corrupted")
    if expected_shapes is not None and [tuple(s) for s in expected_shapes] != shapes:
        raise SerializationError(f"shape mismatch: blob has {shapes}, expected {[tuple(s) for s in expected_shapes]}")
    weights, offset = [], 0
    for shape, size in zip(shapes, sizes):
        weights.append(np.frombuffer(payload, dtype=DTYPE, count=size // 8, offset=offset).reshape(shape).copy())
        offset += size
    return weights, header["meta"]


def to_b64(blob: bytes) -> str:
    """The blob as ASCII base64, the form it takes in JSON messages and MongoDB documents (field `weights`)."""
    return base64.b64encode(blob).decode("ascii")


def from_b64(text: str) -> bytes:
    """Inverse of `to_b64`; raises `SerializationError` on text that is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SerializationError(f"weights field is not base64: {exc}") from None
