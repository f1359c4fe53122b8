"""The Superset dashboards, end to end: MongoDB documents -> Superset (bundle imported) -> headless Chromium.

Every dashboard of the bundle must render every chart without an error; figures must match MongoDB;
re-importing the bundle must update in place, never duplicate. Screenshots go to ``artifacts/``.
"""
from __future__ import annotations

import time

import pytest
import yaml

from visualization import superset_server
from visualization.bundle_archive import BUNDLE_DIR

pytestmark = pytest.mark.e2e

CHART_TIMEOUT_S = 120
NO_RESULTS = "No results"  # Superset's empty state: "No results were returned for this query"
# One entry per chart on the page: its name, viz type, error text, whether it is still loading or drawn.
CHART_STATES_JS = """
return Array.from(document.querySelectorAll('[data-test="chart-grid-component"]')).map(chart => {
  const body = chart.querySelector('[data-test="slice-container"]');
  const error = chart.querySelector('.ant-alert-error');
  return {
    name: chart.getAttribute('data-test-chart-name'),
    viz: chart.getAttribute('data-test-viz-type'),
    error: error ? error.innerText : null,
    loading: !!chart.querySelector('[data-test="loading-indicator"], .loading'),
    drawn: !!(body && body.querySelector('canvas, svg, table, .header-line')),
    text: body ? body.innerText : '',
  };
});
"""


def _bundle_yaml(kind: str) -> list[dict]:
    return [yaml.safe_load(path.read_text()) for path in sorted((BUNDLE_DIR / kind).rglob("*.yaml"))]


DASHBOARDS = _bundle_yaml("dashboards")


def _log_in(browser, url: str, login: dict) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/login/")
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.ID, "username"))
    browser.find_element(By.ID, "username").send_keys(login["username"])
    browser.find_element(By.ID, "password").send_keys(login["password"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(lambda b: "/login" not in b.current_url)


def _wait_for_charts(browser, expected: int) -> list[dict]:
    """Wait until all `expected` charts of the page are drawn or failed; their final states."""
    deadline = time.monotonic() + CHART_TIMEOUT_S
    while True:
        states = browser.execute_script(CHART_STATES_JS)
        settled = len(states) == expected and all(
            s["error"] or (not s["loading"] and (s["drawn"] or NO_RESULTS in s["text"])) for s in states)
        if settled:
            time.sleep(1)  # let the last animations finish before the screenshot
            return browser.execute_script(CHART_STATES_JS)
        if time.monotonic() > deadline:
            pytest.fail(f"charts not drawn after {CHART_TIMEOUT_S} s: {states}")
        time.sleep(0.5)


def _chart(states: list[dict], name: str) -> dict:
    return next(s for s in states if s["name"] == name)


def _number(text: str) -> int:
    return int(text.strip().replace(",", ""))


def _screenshot(browser, path) -> None:
    """Screenshot of the whole page (the window is grown to the page's height first)."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1600, max(1200, height))
    browser.save_screenshot(str(path))


@pytest.fixture(scope="module")
def logged_in_browser(browser, superset, dashboard_cfg):
    _log_in(browser, superset, superset_server.credentials(dashboard_cfg))
    return browser


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=[d["slug"] for d in DASHBOARDS])
def test_dashboard_renders_every_chart_without_error(dashboard, logged_in_browser, superset, artifacts_dir):
    browser = logged_in_browser
    browser.set_window_size(1600, 2400)  # every chart in view: Superset draws charts only when visible
    browser.get(f"{superset}/superset/dashboard/{dashboard['slug']}/?standalone=1")
    expected = sum(len(row["charts"]) for row in dashboard["layout"])
    states = _wait_for_charts(browser, expected)
    _screenshot(browser, artifacts_dir / f"dashboard-{dashboard['slug']}.png")
    failed = {s["name"]: s["error"] for s in states if s["error"]}
    assert not failed, f"charts with errors on {dashboard['slug']}: {failed}"
    empty = [s["name"] for s in states if NO_RESULTS in s["text"]]
    assert not empty, f"charts without data on {dashboard['slug']}: {empty}"


def test_fleet_figures_equal_mongodb_counts(logged_in_browser, superset, dashboard_db, dashboard_cfg):
    names = dashboard_cfg.mongo.collections
    logged_in_browser.set_window_size(1600, 2400)
    logged_in_browser.get(f"{superset}/superset/dashboard/flead-fleet/?standalone=1")
    states = _wait_for_charts(logged_in_browser, 9)
    assert _number(_chart(states, "Alerts total")["text"]) == dashboard_db[names.alerts].count_documents({})
    assert _number(_chart(states, "Readings scored")["text"]) == dashboard_db[names.predictions].count_documents({})
    assert _number(_chart(states, "Devices reporting")["text"]) == len(
        dashboard_db[names.predictions].distinct("device_id"))


def test_alert_device_link_opens_the_filtered_drilldown(logged_in_browser, superset, dashboard_db, dashboard_cfg,
                                                        artifacts_dir):
    from selenium.webdriver.common.by import By

    browser = logged_in_browser
    browser.set_window_size(1600, 2400)
    browser.get(f"{superset}/superset/dashboard/flead-fleet/?standalone=1")
    _wait_for_charts(browser, 9)
    link = browser.find_element(By.CSS_SELECTOR, '[data-test-chart-name="Latest alerts"] table a[href*="flead-device"]')
    device = link.text
    browser.get(link.get_attribute("href"))
    states = _wait_for_charts(browser, 3)
    _screenshot(browser, artifacts_dir / "dashboard-flead-device-from-alert-link.png")
    expected = dashboard_db[dashboard_cfg.mongo.collections.predictions].count_documents(
        {"device_id": device, "is_anomaly": True})
    assert _number(_chart(states, "Anomalies of the device")["text"]) == expected
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-test-chart-name="Alerts of the device"] tbody tr')
    assert rows and {row.find_element(By.CSS_SELECTOR, "a").text for row in rows} == {device}


def test_empty_collection_shows_no_rows_not_an_error(logged_in_browser, superset, dashboard_db, dashboard_cfg):
    dashboard_db[dashboard_cfg.mongo.collections.dead_letters].delete_many({})
    logged_in_browser.set_window_size(1600, 2400)
    logged_in_browser.get(f"{superset}/superset/dashboard/flead-data-quality/?standalone=1")
    states = _wait_for_charts(logged_in_browser, 3)
    assert not [s for s in states if s["error"]], states
    assert _number(_chart(states, "Dead letters total")["text"]) == 0


def test_importing_twice_keeps_one_copy_of_everything(superset, dashboard_cfg):
    superset_server.import_bundle(dashboard_cfg)
    api = superset_server.api_session(dashboard_cfg)
    expected = {"dashboard": ("dashboard_title", _bundle_yaml("dashboards")),
                "chart": ("slice_name", _bundle_yaml("charts")),
                "dataset": ("table_name", _bundle_yaml("datasets")),
                "database": ("database_name", _bundle_yaml("databases"))}
    for kind, (title, items) in expected.items():
        listed = api.get(f"{superset}/api/v1/{kind}/", params={"q": "(page_size:100)"}).json()["result"]
        assert sorted(row[title] for row in listed) == sorted(item[title] for item in items), kind
