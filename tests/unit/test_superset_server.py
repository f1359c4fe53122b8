"""The Superset adapter's own checks, without Superset: a clear error when MongoDB is down, a valid generated config."""
from __future__ import annotations

import ast
import time

import pytest

from config import load_config
from services import processes
from visualization import superset_server


@pytest.fixture
def cfg(tmp_path):
    """A Config whose MongoDB (with a password in its URI) does not answer, and its own state directory."""
    uri = f"mongodb://flead:hunter2@127.0.0.1:{processes.free_port()}/"
    return load_config(env={"FLEAD_MONGO_URI": uri, "FLEAD_STATE_DIR": str(tmp_path)})


def test_importing_the_dashboards_without_mongodb_fails_at_once_and_says_why(cfg):
    started = time.monotonic()
    with pytest.raises(superset_server.SupersetError, match=r"MongoDB at mongodb://flead:\*\*\*@127\.0\.0\.1:\d+/ "
                                                            r"does not answer.*flead up") as error:
        superset_server.import_bundle(cfg)
    assert "hunter2" not in str(error.value)
    assert time.monotonic() - started < 10  # not Superset's 30 s per dataset


def test_the_generated_superset_config_is_python_that_allows_no_third_party_host(cfg):
    superset_server.credentials(cfg)
    text = superset_server._write_superset_config(cfg).read_text()
    compile(text, "superset_config.py", "exec")
    start = text.index("TALISMAN_CONFIG = ") + len("TALISMAN_CONFIG = ")
    policy = ast.literal_eval(text[start:text.index("\n}\n", start) + 2])["content_security_policy"]
    sources = [source for value in policy.values() for source in ([value] if isinstance(value, str) else value)]
    assert sources and not [source for source in sources if "." in source or "http" in source]
    assert "superset_sign_in_guard.py" in text and "SECRET_KEY = json.load" in text
