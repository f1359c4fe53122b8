"""Stand-ins for the clients' objects in unit tests that run without a broker."""
from __future__ import annotations


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
