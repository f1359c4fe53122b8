"""The embedded broker's cluster id."""
import base64
import uuid
from unittest import mock

from orchestration.stack import kafka_cluster_id


def test_a_cluster_id_never_starts_with_a_dash():
    dash_first = uuid.UUID(bytes=base64.urlsafe_b64decode("-" + "A" * 21 + "=="))
    with mock.patch("orchestration.stack.uuid.uuid4", side_effect=[dash_first, uuid.UUID(int=1)]):
        cluster_id = kafka_cluster_id()
    assert cluster_id == base64.urlsafe_b64encode(uuid.UUID(int=1).bytes).decode().rstrip("=")
    assert not kafka_cluster_id().startswith("-") and len(kafka_cluster_id()) == 22
