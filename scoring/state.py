"""What the stream job keeps per device in Flink keyed state.

The state object lives in the Python worker's state cache between bundles and is serialised only when the cache
writes it back to Flink (once per bundle, not once per micro-batch). Pickling goes through the detector's own
versioned, checksummed format (`DeviceDetector.to_bytes`), so no pickled NumPy internals ever reach a checkpoint.
"""
from __future__ import annotations

from typing import NamedTuple

from models.detector import DeviceDetector
from models.secure_aggregation import generate_key_pair


class DeviceState:
    """A device's detector, when and at which reading count it last sent a weight snapshot, the highest ``seq`` it
    has scored (a reading at or below it is a duplicate: neither scored nor learned again), and, with secure
    aggregation, its X25519 key pair and the rounds it has answered."""

    __slots__ = ("detector", "last_snapshot_ms", "n_seen_at_snapshot", "last_seq", "secure_private",
                 "secure_public", "answered_round", "revealed_round")

    def __init__(self, detector: DeviceDetector, last_snapshot_ms: int, n_seen_at_snapshot: int = 0,
                 last_seq: int = -1, secure_private: bytes | None = None, secure_public: bytes | None = None,
                 answered_round: str | None = None, revealed_round: str | None = None):
        self.detector = detector
        self.last_snapshot_ms = last_snapshot_ms
        self.n_seen_at_snapshot = n_seen_at_snapshot
        self.last_seq = last_seq
        self.secure_private, self.secure_public = secure_private, secure_public
        self.answered_round, self.revealed_round = answered_round, revealed_round

    def secure_keys(self) -> tuple[bytes, bytes]:
        """The device's (private, public) X25519 key pair for secure aggregation, made on first use; it stays in
        keyed state (checkpointed with the model), so a restart answers cohorts under the same public key."""
        if self.secure_private is None:
            self.secure_private, self.secure_public = generate_key_pair()
        return self.secure_private, self.secure_public

    def snapshot_due(self, now_ms: int, every_readings: int, interval_ms: int) -> bool:
        """True after `every_readings` new readings, or `interval_ms` since the last snapshot if it learned any."""
        new_readings = self.detector.n_seen - self.n_seen_at_snapshot
        return new_readings >= every_readings or (new_readings > 0 and now_ms - self.last_snapshot_ms >= interval_ms)

    def take_snapshot(self, now_ms: int) -> dict:
        """`DeviceDetector.snapshot()`, remembering when it was taken."""
        self.last_snapshot_ms = now_ms
        self.n_seen_at_snapshot = self.detector.n_seen
        return self.detector.snapshot()

    @classmethod
    def restore(cls, blob: bytes, *fields) -> "DeviceState":
        return cls(DeviceDetector.from_bytes(blob), *fields)

    def __reduce__(self):
        return DeviceState.restore, (self.detector.to_bytes(), self.last_snapshot_ms, self.n_seen_at_snapshot,
                                     self.last_seq, self.secure_private, self.secure_public, self.answered_round,
                                     self.revealed_round)


class KeyedDevice(NamedTuple):
    """All the stream job keeps for one device, in one keyed state: its `DeviceState` (None until its first
    micro-batch is scored), the messages of its partial micro-batch (None if there is none) and the flush timers
    set for that batch, ``(processing time, event time or None)``.

    One state rather than two: at the end of a bundle the JVM waits while the Python worker writes each keyed state
    changed in the bundle back, one synchronous round trip each (flink_jobs/README.md, "Latency")."""

    state: DeviceState | None = None
    buffered: list | None = None
    timers: tuple[int | None, int | None] | None = None

    @classmethod
    def of(cls, value, older_buffer=None) -> "KeyedDevice":
        """The keyed value restored from any checkpoint as a `KeyedDevice`. Checkpoints of the earlier layout hold
        the `DeviceState` alone (or None), and the partial micro-batch in a keyed state of its own
        (`older_buffer`: its list of messages, or ``(timers, messages)``, or None)."""
        if isinstance(value, KeyedDevice):
            return value
        if older_buffer is None or isinstance(older_buffer, list):
            return cls(value, older_buffer)
        timers, buffered = older_buffer
        return cls(value, buffered, timers)
