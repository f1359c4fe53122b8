"""Model weights as bytes: a magic header, a JSON header and raw little-endian float64 or float32 arrays. No pickle.

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

float32 arrays (a snapshot's low-rank factor) travel as float32, everything else as float64 (format 2 when a
blob holds float32 arrays; a blob of float64 arrays only keeps format 1, so older readers still read it):

>>> [w.dtype.name for w in loads(dumps([np.ones(2, dtype=np.float32), np.ones(2)]))[0]]
['float32', 'float64']
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import struct
from typing import Any, Sequence

import numpy as np

MAGIC = b"FLEADW\x00\x01"
FORMAT_VERSION = 1
FORMAT_VERSION_MIXED = 2  # per-array dtypes ("dtypes"): float32 arrays stay float32
DTYPE = "<f8"  # arrays travel as little-endian float64 (exact for weights and for counters below 2**53) ...
DTYPE_SMALL = "<f4"  # ... or float32, when they are float32 already (compact weights chosen by the model)
_LENGTH = struct.Struct("<I")


class SerializationError(ValueError):
    """A blob that is not a valid FLEAD weight blob (truncated, tampered, wrong magic or wrong shapes)."""


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _digest(header: dict, payload: bytes) -> str:
    unsigned = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(_canonical(unsigned) + payload).hexdigest()


def dumps(weights: Sequence[np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
    """Serialise `weights` (float32 arrays as float32, anything else cast to float64) with a JSON-serialisable
    `meta` dict.

    `meta["architecture"]` and `meta["model_version"]`, when present, are also copied to the header's top level.
    """
    meta = dict(meta or {})
    dtypes = [DTYPE_SMALL if np.asarray(w).dtype == np.float32 else DTYPE for w in weights]
    arrays = [np.require(np.asarray(w, dtype=dtype), requirements="C") for w, dtype in zip(weights, dtypes)]
    payload = b"".join(a.tobytes() for a in arrays)
    mixed = DTYPE_SMALL in dtypes
    header = {
        "format_version": FORMAT_VERSION_MIXED if mixed else FORMAT_VERSION,
        "architecture": meta.get("architecture"),
        "model_version": meta.get("model_version"),
        "dtype": DTYPE,
        "shapes": [list(a.shape) for a in arrays],
        "meta": meta,
    }
    if mixed:
        header["dtypes"] = dtypes
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
        shapes = [tuple(_dimension(n) for n in shape) for shape in header["shapes"]]
        version, dtype, digest = header["format_version"], header["dtype"], header["sha256"]
        dtypes = header["dtypes"] if version == FORMAT_VERSION_MIXED else [dtype] * len(shapes)
        meta = header.get("meta", {})
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise SerializationError(f"corrupt header: {exc}") from None
    if not isinstance(meta, dict):
        raise SerializationError(f"corrupt header: meta is a {type(meta).__name__}, not an object")
    if (version not in (FORMAT_VERSION, FORMAT_VERSION_MIXED) or dtype != DTYPE or not isinstance(dtypes, list)
            or len(dtypes) != len(shapes) or not all(d in (DTYPE, DTYPE_SMALL) for d in dtypes)):
        raise SerializationError(f"unsupported format {version} / dtype {dtype} (this reader: formats "
                                 f"{FORMAT_VERSION}, {FORMAT_VERSION_MIXED}; arrays {DTYPE} or {DTYPE_SMALL})")
    payload = blob[start + header_len:]
    itemsizes = [np.dtype(d).itemsize for d in dtypes]
    sizes = [math.prod(shape) * size for shape, size in zip(shapes, itemsizes)]
    if len(payload) != sum(sizes):
        raise SerializationError(f"payload is {len(payload)} bytes, shapes {shapes} need {sum(sizes)}: truncated?")
    if _digest(header, payload) != digest:
        raise SerializationError("SHA-256 mismatch: the blob was altered or corrupted")
    if expected_shapes is not None and [tuple(s) for s in expected_shapes] != shapes:
        raise SerializationError(f"shape mismatch: blob has {shapes}, expected {[tuple(s) for s in expected_shapes]}")
    weights, offset = [], 0
    for shape, size, dtype, itemsize in zip(shapes, sizes, dtypes, itemsizes):
        weights.append(np.frombuffer(payload, dtype=dtype, count=size // itemsize, offset=offset).reshape(shape)
                       .astype(np.dtype(dtype).newbyteorder("=")))
        offset += size
    return weights, meta


def _dimension(n: Any) -> int:
    """One dimension of a header's shape: a non-negative integer (a crafted header may hold anything)."""
    if type(n) is not int or n < 0:
        raise ValueError(f"shape dimension {n!r:.40} is not a non-negative integer")
    return n


def to_b64(blob: bytes) -> str:
    """The blob as ASCII base64, the form it takes in JSON messages and MongoDB documents (field `weights`)."""
    return base64.b64encode(blob).decode("ascii")


def from_b64(text: str) -> bytes:
    """Inverse of `to_b64`; raises `SerializationError` on text that is not base64."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SerializationError(f"weights field is not base64: {exc}") from None
