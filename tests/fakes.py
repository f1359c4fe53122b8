"""Stand-ins for the clients' objects in unit tests that run without a broker, and inputs as an attacker makes them."""
from __future__ import annotations

import json


class KafkaMessage:
    """What our code reads from a confluent-kafka `Message`: its topic, partition, offset, key and value."""

    def __init__(self, value, key=None, topic="flead.telemetry", offset=0, partition=0):
        self._value, self._key, self._topic, self._offset, self._partition = value, key, topic, offset, partition

    def error(self):
        return None

    def topic(self):
        return self._topic

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset

    def key(self):
        return self._key

    def value(self):
        return self._value


class DeliveryError:
    """The `KafkaError` of a failed delivery report."""

    def name(self):
        return "MSG_TIMED_OUT"

    def str(self):
        return "Local: Message timed out"


class Producer:
    """A confluent-kafka `Producer` without a broker: queues messages (with the Kafka ``timestamp`` each was given,
    None for the producer's clock) and reports their delivery on poll/flush; fails the messages whose key is in
    ``failing``."""

    def __init__(self, failing=()):
        self.sent, self.queue, self.failing, self.timestamps = [], [], set(failing), []

    def produce(self, topic, value, key=None, on_delivery=None, timestamp=None):
        self.queue.append((topic, key, value, on_delivery))
        self.timestamps.append(timestamp)

    def poll(self, timeout=0):
        for topic, key, value, callback in self.queue:
            self.sent.append((topic, key, value))
            callback(DeliveryError() if key in self.failing else None, None)
        self.queue = []
        return 0

    def flush(self, timeout=None):
        self.poll()
        return 0

    def __len__(self):
        return len(self.queue)


def crafted_blob(blob: bytes, drop: tuple[str, ...] = (), **changes) -> bytes:
    """A `models.serialization` weight blob whose header was edited (`changes`, fields in `drop` removed) and its
    digest computed again: the digest is a checksum, not a signature, so anyone can (e.g. a device posting its own
    snapshot through the REST API)."""
    from models.serialization import _LENGTH, MAGIC, _canonical, _digest
    (length,) = _LENGTH.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    header = {k: v for k, v in {**json.loads(blob[start:start + length]), **changes}.items() if k not in drop}
    payload = blob[start + length:]
    header["sha256"] = _digest(header, payload)
    encoded = _canonical(header)
    return MAGIC + _LENGTH.pack(len(encoded)) + encoded + payload
