"""Fixtures of the dashboard tests: sample documents in MongoDB, Superset on a free port, headless Chromium."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from config import PROJECT_ROOT, load_config
from services import processes
from sample_documents import write_sample_documents
from visualization import superset_server

ARTIFACTS_DIR = PROJECT_ROOT / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def dashboard_cfg(stack):
    """A Config on the session's MongoDB with its own database, and a free port for Superset."""
    overrides = {**stack.cfg.to_env(), "FLEAD_SUPERSET_PORT": str(processes.free_port()),
                 "FLEAD_MONGO_DATABASE": f"{stack.cfg.mongo.database}_dashboards_{uuid.uuid4().hex[:8]}"}
    return load_config(env={**os.environ, **overrides})


@pytest.fixture(scope="module")
def dashboard_store(dashboard_cfg):
    """The dashboards' database, filled with sample documents (dropped afterwards)."""
    from storage.mongo import Store

    with Store(dashboard_cfg) as store:
        write_sample_documents(store, dashboard_cfg, now_ms=int(time.time() * 1000))
        yield store
        store.client.drop_database(store.name)


@pytest.fixture(scope="module")
def superset(dashboard_cfg, dashboard_store):
    """Superset serving the imported dashboards; its URL. Stopped afterwards."""
    if not (superset_server.SUPERSET_VENV / "bin" / "superset").exists():
        pytest.skip("Superset is not installed: run visualization/setup_superset.sh")
    try:
        yield superset_server.start(dashboard_cfg)
    finally:
        superset_server.stop(dashboard_cfg)


@contextlib.contextmanager
def chromium():
    """Headless Chromium driven by Selenium, with a fresh profile (removed afterwards)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium / chromedriver missing: run visualization/setup_superset.sh")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="flead-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1600,1200", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """A browser for the module's tests (signed in once by those that need it)."""
    with chromium() as driver:
        yield driver


@pytest.fixture
def own_browser():
    """A browser of the test's own, for a test that signs out or in again."""
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR
