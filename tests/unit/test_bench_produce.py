"""bench/produce.py: its report is JSON (the producer's configuration holds a logger object)."""
import json
import sys
from pathlib import Path

from config import load_config
from telemetry.producer import producer_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from produce import reported_config  # noqa: E402


def test_the_reported_configuration_is_json_without_the_broker_address():
    config = producer_config(load_config())
    assert any(not isinstance(v, (str, int, float, bool)) for v in config.values())  # the logger
    shown = reported_config(config)
    json.dumps(shown)
    assert "bootstrap.servers" not in shown and "logger" not in shown
    assert shown["linger.ms"] == config["linger.ms"]
