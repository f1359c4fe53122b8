"""Test isolation: a configuration with its own Kafka topics and MongoDB database on the session's servers (the `cfg`
fixture of tests/conftest.py; modules that share one stream job between tests use it at module scope)."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

from config import Config, load_config
from orchestration import stack as local_stack


@contextmanager
def fresh_config(session_cfg: Config, **env: str):
    """A Config on the servers of `session_cfg` with its own topics and database (dropped afterwards), its settings
    exported to `os.environ` meanwhile; `env`: further FLEAD_* settings."""
    suffix = uuid.uuid4().hex[:8]
    overrides = {**session_cfg.to_env()}
    for key, name in session_cfg.kafka.topics.to_dict().items():
        overrides[f"FLEAD_KAFKA_TOPICS_{key.upper()}"] = f"{name}.{suffix}"
    overrides["FLEAD_MONGO_DATABASE"] = f"{session_cfg.mongo.database}_{suffix}"
    overrides.update(env)
    test_cfg = load_config(env={**os.environ, **overrides})
    local_stack.ensure_topics(test_cfg)
    from storage.mongo import Store

    setup = Store(test_cfg)
    setup.init()
    saved = {key: os.environ.get(key) for key in overrides}
    os.environ.update(overrides)
    try:
        yield test_cfg
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        setup.client.drop_database(setup.name)
        setup.close()
