"""Shared fixtures: a real Kafka broker and MongoDB server for the test session, started and stopped here.

- `stack`: session-wide servers on free ports in a temporary state directory (never the user's `var/`).
- `cfg`: a Config whose topics and database are fresh for the test (unique names), so tests never see
  each other's data. Its settings are also exported to `os.environ` for the test's duration (child processes
  such as spark-submit or a Flink job read them); `cfg.to_env()` gives the same variables explicitly.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from config import Config, load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules shared by the test folders (stream_support)
from isolation import fresh_config  # noqa: E402
from orchestration import stack as local_stack
from services import processes


@dataclass
class Stack:
    """The servers of one test session."""

    cfg: Config
    state_dir: Path

    @property
    def bootstrap(self) -> str:
        return self.cfg.kafka_bootstrap

    @property
    def mongo_uri(self) -> str:
        return self.cfg.mongo_uri


def _session_env(state_dir: Path) -> dict[str, str]:
    env = {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_STREAM_TIMESTAMP_WINDOW_S": "0"}  # tests replay recorded data
    if not os.environ.get("FLEAD_KAFKA_BOOTSTRAP"):
        env |= {"FLEAD_KAFKA_PORT": str(processes.free_port()),
                "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port())}
    if not os.environ.get("FLEAD_MONGO_URI"):
        env["FLEAD_MONGO_PORT"] = str(processes.free_port())
    return env


@pytest.fixture(scope="session")
def stack():
    """Real Kafka + MongoDB for the session (or the external ones named by FLEAD_KAFKA_BOOTSTRAP/FLEAD_MONGO_URI)."""
    state_dir = Path(tempfile.mkdtemp(prefix="flead-test-"))
    env = _session_env(state_dir)
    cfg = load_config(env={**os.environ, **env})
    try:
        local_stack.up(cfg, say=lambda line: None)
        yield Stack(cfg=cfg, state_dir=state_dir)
    finally:
        local_stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def cfg(stack):
    """A Config on the session's servers with this test's own topics and database."""
    with fresh_config(stack.cfg) as test_cfg:
        yield test_cfg


@pytest.fixture
def store(cfg):
    """A `Store` on the test's own MongoDB database (dropped afterwards)."""
    from storage.mongo import Store

    with Store(cfg) as opened:
        yield opened


@pytest.fixture
def db(store):
    """The same `Store` under the name older tests use (raw pymongo below it: ``db.db``)."""
    return store
