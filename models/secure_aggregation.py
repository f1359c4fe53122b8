"""Secure aggregation with pairwise masks agreed between devices (after Bonawitz et al. 2017, "Practical Secure
Aggregation for Privacy-Preserving Machine Learning"): the aggregator learns the sum of a round's updates, never
one of them.

The protocol, one round (who runs what: docs/privacy.md):

1. Each device holds an X25519 key pair in its state (`generate_key_pair`) and publishes its public key with its
   snapshots.
2. The aggregator announces the round's cohort (`Cohort`: round id, members and their public keys, vector length,
   fixed-point scale), signed, on the global-model topic.
3. Each member encodes ``[w·v, w]`` (its update vector ``v`` times its weight ``w``, then ``w``) in fixed point
   and adds, for every other member, a mask drawn from a seed that only the two of them can compute (X25519
   agreement, HKDF-SHA256 bound to the round and the pair, ChaCha20 as the generator): `masked_update`. The lower
   id adds the mask, the higher one subtracts it, so over the whole cohort the masks cancel; modulo 2⁶⁴ a masked
   vector is uniformly distributed whatever the update.
4. The aggregator adds the masked vectors (`unmask_sum`) and divides: FedAvg of the cohort, exact up to the
   fixed-point rounding. If members dropped out, each survivor reveals its pair seeds with the dropped ones
   (`reveal_pair_seeds`) and the aggregator removes those masks.

What the real protocol adds (not built here, see docs/privacy.md): a second, per-device "self" mask and t-of-n
Shamir shares of both secrets, so that a device declared dropped whose masked vector arrives late is not exposed
and the aggregator can recover dropouts without asking the survivors; and signatures on the key announcements
against an active aggregator.

>>> keys = {d: generate_key_pair() for d in ("a", "b", "c")}
>>> cohort = Cohort("r1", {d: pub for d, (_, pub) in keys.items()}, length=3)   # 2 numbers + the weight
>>> masked = {d: masked_update(np.array(v), 1.0, d, keys[d][0], cohort)
...           for d, v in {"a": [1.0, 2.0], "b": [0.5, 0.5], "c": [-1.0, 0.0]}.items()}
>>> np.round(unmask_sum(masked, cohort), 6)
array([0.5, 2.5, 3. ])
"""
from __future__ import annotations

import base64
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from models.updates import AggregationError, AggregationResult, Update, Weights, flatten, unflatten

FIXED_POINT_BITS = 24   # fractional bits: resolution 6e-8
RING_BITS = 64          # words are uint64: arithmetic modulo 2⁶⁴
_RAW = serialization.Encoding.Raw


def generate_key_pair() -> tuple[bytes, bytes]:
    """A device's X25519 key pair as raw bytes (private, public), 32 bytes each, from OS entropy."""
    private = X25519PrivateKey.generate()
    return (private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def public_key_b64(public: bytes) -> str:
    return base64.b64encode(public).decode("ascii")


def public_key_from_b64(text: str) -> bytes:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError(f"an X25519 public key has 32 bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class Cohort:
    """One round's members (device id → X25519 public key), the vector length each masks (update + weight) and
    the fixed-point scale. Announced by the aggregator; every member masks against every other."""

    round_id: str
    members: Mapping[str, bytes]
    length: int
    fixed_point_bits: int = FIXED_POINT_BITS

    @property
    def ids(self) -> list[str]:
        return sorted(self.members)

    def max_abs(self) -> float:
        """The largest |value| a member may encode so that the cohort's sum cannot wrap around the ring."""
        return 2.0 ** (RING_BITS - 2 - self.fixed_point_bits) / max(len(self.members), 1)


def encode_fixed_point(vector: np.ndarray, bits: int, max_abs: float) -> np.ndarray:
    """Float vector → ring elements (two's complement of round(x · 2^bits), as uint64)."""
    vector = np.asarray(vector, dtype=np.float64)
    if not np.all(np.isfinite(vector)):
        raise ValueError("secure aggregation: cannot encode non-finite values (NaN or infinity)")
    if np.any(np.abs(vector) > max_abs):
        raise ValueError(f"secure aggregation: |values| above {max_abs:.3g} would let the cohort's sum wrap around")
    return np.round(vector * 2.0 ** bits).astype(np.int64).view(np.uint64)


def decode_fixed_point(ring: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements → float vector (inverse of `encode_fixed_point`, also for sums)."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** bits


def pair_seed(own_private: bytes, peer_public: bytes, round_id: str, own_id: str, peer_id: str) -> bytes:
    """The 32-byte seed two members share for one round: HKDF-SHA256 of their X25519 secret, bound to the round
    and the (sorted) pair, so seeds of other rounds or pairs say nothing about it."""
    shared = X25519PrivateKey.from_private_bytes(own_private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    low, high = sorted((own_id, peer_id))
    info = f"flead.secagg/1|{round_id}|{low}|{high}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def mask_from_seed(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniformly random uint64 words: the ChaCha20 key stream of ``seed``."""
    stream = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor().update(b"\x00" * (8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _signed_mask(own_id: str, peer_id: str, seed: bytes, length: int) -> np.ndarray:
    mask = mask_from_seed(seed, length)
    return mask if own_id < peer_id else (np.uint64(0) - mask)


def masked_update(vector: np.ndarray, weight: float, device_id: str, own_private: bytes, cohort: Cohort
                  ) -> np.ndarray:
    """Device side: ``[weight·vector, weight]`` in fixed point plus this device's pairwise masks (uint64 words).

    ``vector`` is the device's federated vector (`models.updates.VectorCodec`); ``weight`` its FedAvg weight,
    capped by the device (the aggregator cannot cap what it cannot see).
    """
    if device_id not in cohort.members:
        raise ValueError(f"secure aggregation: {device_id!r} is not in the cohort of round {cohort.round_id}")
    payload = np.append(weight * np.asarray(vector, dtype=np.float64), float(weight))
    if payload.shape != (cohort.length,):
        raise ValueError(f"secure aggregation: round {cohort.round_id} masks vectors of {cohort.length - 1} "
                         f"numbers, this update has {payload.size - 1}")
    total = encode_fixed_point(payload, cohort.fixed_point_bits, cohort.max_abs())
    for peer in cohort.ids:
        if peer != device_id:
            seed = pair_seed(own_private, cohort.members[peer], cohort.round_id, device_id, peer)
            total = total + _signed_mask(device_id, peer, seed, cohort.length)
    return total


def reveal_pair_seeds(device_id: str, own_private: bytes, cohort: Cohort, dropped: Sequence[str]) -> dict[str, bytes]:
    """Survivor side, after dropouts: this device's pair seeds with the dropped members (never with survivors)."""
    return {peer: pair_seed(own_private, cohort.members[peer], cohort.round_id, device_id, peer)
            for peer in dropped if peer != device_id and peer in cohort.members}


def unmask_sum(masked: Mapping[str, np.ndarray], cohort: Cohort,
               revealed: Mapping[str, Mapping[str, bytes]] | None = None) -> np.ndarray:
    """Aggregator side: the sum of the survivors' ``[w·v, w]`` vectors.

    ``revealed[survivor][dropped]`` are the seeds survivors gave up for dropped members: their masks did not
    cancel and are removed here. Raises if a dropped member's seed is missing from any survivor.
    """
    unknown = set(masked) - set(cohort.members)
    if unknown:
        raise AggregationError(f"secure aggregation: vectors from devices outside the cohort of round "
                               f"{cohort.round_id}: {sorted(unknown)}")
    if not masked:
        raise AggregationError(f"secure aggregation: no masked vector arrived for round {cohort.round_id}")
    total = np.zeros(cohort.length, dtype=np.uint64)
    for device, vector in masked.items():
        vector = np.asarray(vector)
        if vector.dtype != np.uint64 or vector.shape != (cohort.length,):
            raise AggregationError(f"secure aggregation: {device}'s masked vector is {vector.dtype} "
                                   f"{vector.shape}, expected uint64 ({cohort.length},)")
        total = total + vector
    dropped = [d for d in cohort.ids if d not in masked]
    revealed = revealed or {}
    for survivor in masked:
        for gone in dropped:
            seed = revealed.get(survivor, {}).get(gone)
            if seed is None:
                raise AggregationError(f"secure aggregation: {gone} dropped out of round {cohort.round_id} and "
                                       f"{survivor} has not revealed their pair seed: the sum stays masked")
            total = total - _signed_mask(survivor, gone, seed, cohort.length)
    return decode_fixed_point(total, cohort.fixed_point_bits)


def encode_words(words: np.ndarray) -> str:
    """Masked words as base64 of little-endian uint64 (the ``weights`` field of a masked snapshot)."""
    return base64.b64encode(np.asarray(words, dtype="<u8").tobytes()).decode("ascii")


def decode_words(text: str, length: int) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 8 * length:
        raise ValueError(f"masked vector of {len(raw)} bytes, round expects {length} words ({8 * length} bytes)")
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64)


@dataclass
class SecureRound:
    """What the aggregator holds for one secure round: the announced cohort, the seeds survivors revealed, and
    the layer shapes of the devices' wire weights (from their enrolments)."""

    cohort: Cohort
    revealed: dict[str, dict[str, bytes]] = field(default_factory=dict)
    shapes: list[tuple[int, ...]] | None = None


@dataclass
class SecureAggregation:
    """A sum strategy run over masked vectors: each `Update` carries one uint64 array (`masked_update`); the
    result is the weighted mean the wrapped FedAvg would give on the plain updates.

    Only checks that look at a device alone can run on the devices before masking; norms, cosines, medians and
    clusters cannot run here, so `models.aggregation.make_strategy` refuses those strategies.
    """

    inner: object
    round: SecureRound
    name: str = ""

    def __post_init__(self):
        if getattr(self.inner, "policy", None) is None or self.inner.policy.cohort_checks:
            raise AggregationError("secure aggregation reveals only the cohort's sum: norm ratio, cosine and "
                                   "sample-cap checks need individual updates and cannot run")
        self.name = self.name or f"secure-{self.inner.name}"

    def aggregate(self, updates: Sequence[Update], current: Weights | None = None) -> AggregationResult:
        """FedAvg from the masked vectors; ``current`` (or the policy's shapes) gives the layers to rebuild."""
        cohort = self.round.cohort
        masked, rejected = {}, []
        for update in updates:
            words = update.weights[0] if len(update.weights) == 1 else None
            if update.device_id not in cohort.members:
                rejected.append((update.device_id, f"not in the cohort of round {cohort.round_id}"))
            elif words is None or words.dtype != np.uint64 or words.shape != (cohort.length,):
                rejected.append((update.device_id, f"not a masked vector of {cohort.length} words"))
            elif update.device_id in masked:
                rejected.append((update.device_id, "duplicate update from the same device in this round"))
            else:
                masked[update.device_id] = words
        if len(masked) < self.inner.policy.min_devices:
            raise AggregationError(f"{self.name}: {len(masked)} masked update(s) for round {cohort.round_id}, needs "
                                   f"at least {self.inner.policy.min_devices}")
        total = unmask_sum(masked, cohort, self.round.revealed)
        if total[-1] <= 0:
            raise AggregationError(f"{self.name}: the cohort's total weight is not positive")
        mean = total[:-1] / total[-1]
        like = current if current is not None else [np.zeros(s) for s in self.inner.policy.reference_shapes or []]
        weights = unflatten(mean, like) if like else [mean]
        return AggregationResult(weights=weights, participants=sorted(masked), rejected=rejected, norms={},
                                 strategy=self.name, extra={"n_samples": int(round(total[-1])),
                                                            "dropped": [d for d in cohort.ids if d not in masked]})


def secure_fedavg(updates: Sequence[Update], max_weight: float | None = None) -> Weights:
    """FedAvg of plain updates through the whole protocol, in one process (fresh keys, one round): for tests and
    the simulation in docs/privacy.md. Equals `models.aggregation.fedavg` within the fixed-point tolerance."""
    if not updates:
        raise AggregationError("secure FedAvg: no updates")
    keys = {u.device_id: generate_key_pair() for u in updates}
    length = len(flatten(updates[0].weights)) + 1
    cohort = Cohort("simulation", {d: pub for d, (_, pub) in keys.items()}, length)
    weights = {u.device_id: min(u.n_samples, max_weight) if max_weight else u.n_samples for u in updates}
    masked = {u.device_id: masked_update(flatten(u.weights), weights[u.device_id], u.device_id, keys[u.device_id][0],
                                         cohort) for u in updates}
    total = unmask_sum(masked, cohort)
    return unflatten(total[:-1] / total[-1], updates[0].weights)


# ---------------------------------------------------------------- wire records of a secure round

COHORT_SCHEMA = "flead.cohort/1"
ENROLMENT = "enrolment/1"          # a snapshot that only announces the device's public key (no weights)
MASKED = "masked-u64/1"            # a snapshot whose weights are masked words for one round
SEED_REVEAL = "seed-reveal/1"      # a survivor's pair seeds with the round's dropped members
NO_WEIGHTS = "-"                   # the weights field of records that carry none


def enrolment_record(device_id: str, public_key: bytes, vector_length: int, shapes: Sequence[Sequence[int]],
                     version: int, n_seen: int, created_at: int, architecture: str | None = None) -> dict:
    """Device side, secure aggregation on: a `flead.snapshot/1` that announces the device's key and layout
    instead of its weights (sent instead of a plain snapshot until a cohort includes the device). The layout is
    the federated vector's length, the wire weights' shapes and the model's ``architecture`` (which names the
    codec between the two, `models.updates.codec_for`: the subspace kind masks mean + covariance, not its
    wire factor)."""
    record = {"schema": "flead.snapshot/1", "encoding": ENROLMENT, "device_id": device_id, "version": version,
              "global_version": 0, "loss": None, "n_samples": 1, "n_seen": n_seen, "created_at": created_at,
              "public_key": public_key_b64(public_key),
              "vector_length": int(vector_length), "shapes": shapes_text(shapes), "weights": NO_WEIGHTS}
    if architecture:
        record["architecture"] = str(architecture)
    return record


def choose_cohort(enrolments: Sequence[Mapping], round_id: str, base_version: int, max_weight: float,
                  created_at: int, issuer: str, max_members: int | None = None,
                  sample: random.Random | None = None) -> dict:
    """Aggregator side: the `flead.cohort/1` announcement of a round from the devices' newest enrolments (one
    per device, all of the most common layout), at most ``max_members`` of them drawn at random (``sample``; the
    system's randomness by default): every member masks once per other member, so a round costs the fleet
    members² masks. Unsigned: the caller signs it."""
    newest: dict[str, Mapping] = {}
    for e in enrolments:
        if e["device_id"] not in newest or e["created_at"] > newest[e["device_id"]]["created_at"]:
            newest[e["device_id"]] = e
    layouts: dict[tuple, list[str]] = {}
    for device, e in newest.items():
        layout = (int(e["vector_length"]), json_shapes(e["shapes"]), str(e.get("architecture") or ""))
        layouts.setdefault(layout, []).append(device)
    if not layouts:
        raise AggregationError("secure aggregation: no device has announced its key yet (enrolment snapshots)")
    (length, shapes, architecture), members = max(layouts.items(), key=lambda item: len(item[1]))
    if max_members is not None and len(members) > max_members:
        members = (sample or random.SystemRandom()).sample(sorted(members), max_members)
    record = {"schema": COHORT_SCHEMA, "round_id": round_id, "base_version": base_version,
              "members": {d: newest[d]["public_key"] for d in sorted(members)}, "length": length + 1,
              "shapes": shapes_text(shapes), "fixed_point_bits": FIXED_POINT_BITS, "max_weight": max_weight,
              "dropped": [], "created_at": created_at, "issuer": issuer}
    if architecture:
        record["architecture"] = architecture
    return record


def shapes_text(shapes: Sequence[Sequence[int]]) -> list[str]:
    """Layer shapes as ``["19x16", "16", ...]`` (MongoDB documents in FerretDB cannot hold nested arrays)."""
    return ["x".join(str(int(n)) for n in s) for s in shapes]


def json_shapes(shapes: Sequence[str]) -> tuple:
    """Inverse of `shapes_text`, as a tuple of tuples (hashable); ValueError on anything else."""
    return tuple(tuple(int(n) for n in str(s).split("x")) for s in shapes)


def cohort_from_record(record: Mapping) -> Cohort:
    """The `Cohort` of a (verified) `flead.cohort/1` announcement; ValueError if it is malformed."""
    try:
        members = {str(d): public_key_from_b64(k) for d, k in record["members"].items()}
        return Cohort(str(record["round_id"]), members, int(record["length"]), int(record["fixed_point_bits"]))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"{COHORT_SCHEMA}: malformed announcement ({exc})") from None


def answer_cohort(record: Mapping, device_id: str, own_private: bytes, vector: np.ndarray, n_samples: int,
                  version: int, n_seen: int, created_at: int) -> dict | None:
    """Device side: the masked `flead.snapshot/1` with which a member of an announced cohort answers (None if the
    device is not a member). ``vector`` is its federated vector (`models.updates.codec_for(...)`); its weight is
    ``min(n_samples, max_weight)``, capped here because the aggregator cannot see it. Unsigned.

    None too if the announcement lists the device as ``dropped``: the survivors reveal their pair seeds with it,
    so a late masked vector of it would be the only thing between the aggregator and its update in the clear."""
    cohort = cohort_from_record(record)
    if device_id not in cohort.members or device_id in (record.get("dropped") or []):
        return None
    weight = float(min(n_samples, record["max_weight"]))
    words = masked_update(vector, weight, device_id, own_private, cohort)
    return {"schema": "flead.snapshot/1", "encoding": MASKED, "secure_round": cohort.round_id,
            "device_id": device_id, "version": version, "global_version": int(record.get("base_version", 0)),
            "loss": None, "n_samples": n_samples, "n_seen": n_seen, "created_at": created_at,
            "weights": encode_words(words)}


def answer_dropouts(record: Mapping, device_id: str, own_private: bytes, created_at: int, version: int,
                    n_seen: int) -> dict | None:
    """Device side, after a recovery announcement (the cohort record again, with ``dropped``): this survivor's
    pair seeds with the dropped members (None if it is not a member or nobody dropped). Unsigned."""
    cohort = cohort_from_record(record)
    dropped = [d for d in record.get("dropped") or [] if d != device_id]
    if device_id not in cohort.members or device_id in (record.get("dropped") or []) or not dropped:
        return None
    seeds = reveal_pair_seeds(device_id, own_private, cohort, dropped)
    return {"schema": "flead.snapshot/1", "encoding": SEED_REVEAL, "secure_round": cohort.round_id,
            "device_id": device_id, "version": version, "global_version": int(record.get("base_version", 0)),
            "loss": None, "n_samples": 1, "n_seen": n_seen, "created_at": created_at,
            "revealed_seeds": [{"device_id": d, "seed": s.hex()} for d, s in sorted(seeds.items())],
            "weights": NO_WEIGHTS}


def revealed_from_records(records: Sequence[Mapping], cohort: Cohort) -> dict[str, dict[str, bytes]]:
    """Aggregator side: ``revealed[survivor][dropped]`` from verified seed-reveal records of the round.

    ``revealed_seeds`` is a list of ``{"device_id", "seed"}`` (device ids are values, not field names: MongoDB
    field names must be plain identifiers, and the sink refuses others). Entries that are not a member's 32-byte
    hex seed are skipped (the survivor then counts as not having revealed it)."""
    revealed: dict[str, dict[str, bytes]] = {}
    for r in records:
        if r.get("secure_round") != cohort.round_id or r.get("device_id") not in cohort.members:
            continue
        seeds = revealed.setdefault(r["device_id"], {})
        for entry in r.get("revealed_seeds") if isinstance(r.get("revealed_seeds"), list) else []:
            peer, seed = (entry.get("device_id"), entry.get("seed")) if isinstance(entry, Mapping) else (None, None)
            if peer in cohort.members and isinstance(seed, str) and len(seed) == 64:
                try:
                    seeds[peer] = bytes.fromhex(seed)
                except ValueError:
                    continue
    return revealed
