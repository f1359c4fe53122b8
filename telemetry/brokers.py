"""Is a Kafka broker there: the probe that `flead up`, `flead status`, `flead doctor` and `/healthz` share."""
from __future__ import annotations


def kafka_healthy(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when the brokers at `bootstrap` answer a metadata request."""
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=timeout)
        return True
    except Exception:  # any client error means "not healthy yet"
        return False
