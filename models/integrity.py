"""Model integrity: signed wire records and messages, per-device tokens, and the rule for adopting a global model.

Snapshots (`flead.snapshot/1`) and global models (`flead.global-model/1`) carry a ``signature``: HMAC-SHA256,
under a key only FLEAD's own processes hold (``<state_dir>/integrity_key``, 0600, created at first use), over the
canonical JSON of every other field. ``schema`` is one of the fields, so a signed snapshot cannot pass for a global
model. Anyone who can write to Kafka, MongoDB or the REST API without that key cannot make a record every consumer
accepts (`verify_record` names what is wrong). HMAC means every holder of the key can sign: the stream job, the
aggregator and the API are trusted alike (docs/privacy.md).

Telemetry messages (`flead.telemetry/1`) and score batches (`flead.scores/1`) are signed as BYTES instead
(`sign_message`, about a microsecond per KB, no canonical form): the message is one JSON object whose last field
is ``"signature":"hmac-sha256:<64 hex>"``, an HMAC-SHA256 over the message without that field. The stream job
signs score batches with the deployment's key; a device signs its telemetry with its own token
(`device_token`, which the REST API hands out: ``POST /api/device-tokens/{device_id}``) and never holds the key; the
consumers derive the token from the key (`device_message_key`).

A device adopts a verified global model only under `global_model_verdict`: issued by the aggregator, newer than
the model it holds, and building on a version the consumer has seen (so a forged version 1000 cannot freeze the
fleet, and one missed message does not either).

>>> key = bytes(32)
>>> record = sign_record({"schema": "flead.global-model/1", "version": 3, "weights": "AAAA"}, key)
>>> verify_record(record, key) is None
True
>>> verify_record({**record, "version": 1000}, key)
'bad signature: the record was altered or signed with another key'
>>> message = sign_message(b'{"schema":"flead.scores/1","device_id":"d1"}', key)
>>> message[:72]
b'{"schema":"flead.scores/1","device_id":"d1","signature":"hmac-sha256:45f'
>>> verify_message(message, key) is None
True
>>> verify_message(message.replace(b'd1', b'd2'), key)
'bad signature: the message was altered or signed with another key'
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

SIGNATURE_FIELD = "signature"
SIGNATURE_PREFIX = "hmac-sha256:"
AGGREGATOR_ISSUER = "flead-aggregator"
KEY_BYTES = 32
_MESSAGE_FIELD = b',"signature":"'   # how a signed message's last field starts
_MESSAGE_TAIL = len(_MESSAGE_FIELD) + len(SIGNATURE_PREFIX) + 64 + len(b'"}')
# Device tokens kept per process by `device_message_key` (about 200 bytes each): a fleet larger than this costs
# one more HMAC of a short string per message, about a microsecond.
DEVICE_KEYS_CACHED = 100_000


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN: the byte string a signature covers (``signature`` left out).

    A field whose value is null, [] or {} counts as absent, and -0.0 as 0.0, at any depth: stores differ there
    (FerretDB drops null and empty fields and the sign of zero), and a record must verify after a round trip
    through MongoDB.
    """
    body = _canonical({k: v for k, v in record.items() if k != SIGNATURE_FIELD})
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


_PLAIN = (str, int, bool)  # returned as they are (checked by exact type first: most of a record's fields)


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is dict or isinstance(value, Mapping):
        return {k: _canonical(v) for k, v in value.items() if v is not None and not _empty(v)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float):
        return value + 0.0  # -0.0 -> 0.0
    return value


def _empty(value: Any) -> bool:
    """[], () or {} (absent for the signature, like null)."""
    kind = type(value)
    if kind in _PLAIN or kind is float:
        return False
    return isinstance(value, (list, tuple, Mapping)) and len(value) == 0


def _mac(record: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical_json(record), hashlib.sha256).hexdigest()


def sign_record(record: Mapping[str, Any], key: bytes) -> dict:
    """A copy of ``record`` with its ``signature``; the record needs its ``schema`` (what it claims to be)."""
    if "schema" not in record:
        raise ValueError("sign_record: a wire record needs its 'schema' field (it is part of what is signed)")
    return {**{k: v for k, v in record.items() if k != SIGNATURE_FIELD},
            SIGNATURE_FIELD: SIGNATURE_PREFIX + _mac(record, key)}


def verify_record(record: Mapping[str, Any], key: bytes) -> str | None:
    """None if ``record`` carries a valid signature under ``key``, else why not (for the dead letter)."""
    signature = record.get(SIGNATURE_FIELD)
    if signature is None:
        return "unsigned: no 'signature' field"
    if not isinstance(signature, str) or not signature.startswith(SIGNATURE_PREFIX):
        return f"signature: expected '{SIGNATURE_PREFIX}<hex>'"
    try:
        expected = _mac(record, key)
    except (TypeError, ValueError) as exc:  # a field JSON cannot carry (NaN, bytes)
        return f"cannot be signed canonically: {exc}"
    if not hmac.compare_digest(signature[len(SIGNATURE_PREFIX):], expected):
        return "bad signature: the record was altered or signed with another key"
    return None


def wire_form(stored: Mapping[str, Any], schema: str) -> dict:
    """A stored document as the wire record it was (MongoDB adds ``_id`` and the sink drops ``schema``)."""
    return {"schema": schema, **{k: v for k, v in stored.items() if k not in ("_id", "schema")}}


def device_token(key: bytes, device_id: str) -> str:
    """The REST token with which one device (and only it) may send its own snapshots."""
    return hmac.new(key, f"flead.device-token/1|{device_id}".encode(), hashlib.sha256).hexdigest()


def sign_message(message: bytes, key: bytes) -> bytes:
    """``message`` (one JSON object, unsigned) with ``"signature":"hmac-sha256:<64 hex>"`` added as its last field:
    an HMAC-SHA256 under ``key`` over the bytes of ``message`` exactly as given."""
    if len(message) < 3 or message[:1] != b"{" or message[-1:] != b"}" or _MESSAGE_FIELD in message:
        raise ValueError("sign_message: expects one JSON object with at least one field, not yet signed")
    mac = hmac.digest(key, message, "sha256").hex().encode()
    return b"".join((message[:-1], _MESSAGE_FIELD, SIGNATURE_PREFIX.encode(), mac, b'"}'))


def verify_message(message: bytes, key: bytes) -> str | None:
    """None if ``message`` (the bytes as received) ends with a valid signature under ``key``, else why not: it is
    split at the last ``,"signature":"``, which must be followed by exactly ``hmac-sha256:<64 hex>"}``."""
    at = message.rfind(_MESSAGE_FIELD)
    if at < 0:
        return "unsigned: no 'signature' field"
    if (len(message) - at != _MESSAGE_TAIL or message[-2:] != b'"}'
            or not message.startswith(SIGNATURE_PREFIX.encode(), at + len(_MESSAGE_FIELD))):
        return f"bad signature: the last field must be \"signature\":\"{SIGNATURE_PREFIX}<64 hex digits>\""
    expected = hmac.digest(key, message[:at] + b"}", "sha256").hex().encode()
    if not hmac.compare_digest(message[at + len(_MESSAGE_FIELD) + len(SIGNATURE_PREFIX):-2], expected):
        return "bad signature: the message was altered or signed with another key"
    return None


@lru_cache(maxsize=DEVICE_KEYS_CACHED)
def device_message_key(key: bytes, device_id: str) -> bytes:
    """The key a device signs its telemetry with: its `device_token` (the text, as the REST API hands it out)."""
    return device_token(key, device_id).encode()


def sign_device_message(message: bytes, key: bytes, device_id: str) -> bytes:
    """`sign_message` with the device's token derived from the deployment ``key``: how FLEAD's own producers,
    which run where the key is, sign telemetry (a device itself signs with its token)."""
    return sign_message(message, device_message_key(key, device_id))


def device_message_problem(message: bytes, key: bytes, device_id: str, required: bool = True) -> str | None:
    """None if ``message`` is validly signed with the token of ``device_id``, or carries no signature and
    ``required`` is off (`ingest.require_signed_telemetry`); else why it is refused. A bad signature is always
    refused."""
    if not required and _MESSAGE_FIELD not in message:
        return None
    return verify_message(message, device_message_key(key, device_id))


def load_or_create_key(path: Path) -> bytes:
    """The signing key in ``path`` (hex), created with 32 random bytes and mode 0600 on first use."""
    path = Path(path)
    try:
        return _parse_key(path.read_text(), path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it meanwhile
            return _parse_key(path.read_text(), path)
        key = secrets.token_bytes(KEY_BYTES)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
        return key


def _parse_key(text: str, where: Any) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{where}: not a hex signing key; delete it to have a new one made (every process must "
                         "then use the new one)") from None
    if len(key) < 16:
        raise ValueError(f"{where}: a signing key needs at least 16 bytes, got {len(key)}")
    return key


@dataclass(frozen=True)
class Verdict:
    """Whether a consumer takes a global model, and why not (for the log and the dead letter)."""

    adopt: bool
    reason: str = ""


def global_model_verdict(record: Mapping[str, Any], key: bytes, held_version: int, newest_known: int | None,
                         max_version_gap: int) -> Verdict:
    """Whether a consumer holding global version ``held_version`` (0: none) adopts ``record``.

    ``newest_known`` is the newest version this consumer has verified so far (None: none yet, e.g. after a
    fresh start). The record must be validly signed, issued by the aggregator (``issuer``), one version after
    the ``previous_version`` it builds on, newer than ``held_version``, and build on a version at most
    ``max_version_gap`` ahead of ``newest_known`` (a few missed messages are fine; a version far ahead of what
    the aggregator has published is not).
    """
    problem = verify_record(record, key)
    if problem:
        return Verdict(False, problem)
    version, previous = record.get("version"), record.get("previous_version")
    if record.get("issuer") != AGGREGATOR_ISSUER:
        return Verdict(False, f"issuer {record.get('issuer')!r} is not the aggregator ({AGGREGATOR_ISSUER!r})")
    if type(version) is not int or type(previous) is not int or version != previous + 1 or previous < 0:
        return Verdict(False, f"version {version!r} must be previous_version {previous!r} + 1")
    if version <= held_version:
        return Verdict(False, f"version {version} is not newer than the held global version {held_version}")
    if newest_known is not None and previous > newest_known + max_version_gap:
        return Verdict(False, f"version {version} builds on v{previous}, more than {max_version_gap} ahead of the "
                              f"newest version seen (v{newest_known}): not the aggregator's history")
    return Verdict(True)


def signing_key(cfg) -> bytes:
    """The deployment's signing key: `integrity.key` (hex) if set, else the file `integrity.key_file` in the
    state directory, created on first use (0600)."""
    return key_from(*key_source(cfg))


def key_source(cfg) -> tuple[str, Path]:
    """Where `signing_key` finds the key: (`integrity.key`, the absolute path of `integrity.key_file`), for a
    process that must load it later and elsewhere (the stream job's workers) without carrying the key itself."""
    path = Path(cfg.integrity.key_file)
    return cfg.integrity.key, path if path.is_absolute() else cfg.state_dir / path


def key_from(key_hex: str, key_file: Path) -> bytes:
    """The key given as hex if any, else the one in `key_file` (created on first use, 0600)."""
    return _parse_key(key_hex, "integrity.key") if key_hex else load_or_create_key(key_file)
