"""The Superset dashboards, end to end: MongoDB documents -> Superset (bundle imported) -> headless Chromium.

Every dashboard of the bundle must render every chart without an error; figures must match MongoDB;
re-importing the bundle must update in place, never duplicate. Screenshots go to ``artifacts/``.
"""
from __future__ import annotations

import pytest

from browser import (DASHBOARDS, NO_RESULTS, bundle_yaml, chart, expected_charts, log_in, number, open_dashboard,
                     screenshot, wait_for_charts)
from visualization import superset_server

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def logged_in_browser(browser, superset, dashboard_cfg):
    log_in(browser, superset, superset_server.credentials(dashboard_cfg))
    return browser


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=[d["slug"] for d in DASHBOARDS])
def test_dashboard_renders_every_chart_without_error(dashboard, logged_in_browser, superset, artifacts_dir):
    browser = logged_in_browser
    states = open_dashboard(browser, superset, dashboard["slug"], expected_charts(dashboard))
    screenshot(browser, artifacts_dir / f"dashboard-{dashboard['slug']}.png")
    failed = {s["name"]: s["error"] for s in states if s["error"]}
    assert not failed, f"charts with errors on {dashboard['slug']}: {failed}"
    empty = [s["name"] for s in states if NO_RESULTS in s["text"]]
    assert not empty, f"charts without data on {dashboard['slug']}: {empty}"


def test_fleet_figures_equal_mongodb_counts(logged_in_browser, superset, dashboard_db, dashboard_cfg):
    names = dashboard_cfg.mongo.collections
    states = open_dashboard(logged_in_browser, superset, "flead-fleet", 9)
    assert number(chart(states, "Alerts total")["text"]) == dashboard_db[names.alerts].count_documents({})
    assert number(chart(states, "Readings scored")["text"]) == dashboard_db[names.predictions].count_documents({})
    assert number(chart(states, "Devices reporting")["text"]) == len(
        dashboard_db[names.predictions].distinct("device_id"))


def test_alert_device_link_opens_the_filtered_drilldown(logged_in_browser, superset, dashboard_db, dashboard_cfg,
                                                        artifacts_dir):
    from selenium.webdriver.common.by import By

    browser = logged_in_browser
    open_dashboard(browser, superset, "flead-fleet", 9)
    link = browser.find_element(By.CSS_SELECTOR, '[data-test-chart-name="Latest alerts"] table a[href*="flead-device"]')
    device = link.text
    browser.get(link.get_attribute("href"))
    states = wait_for_charts(browser, 3)
    screenshot(browser, artifacts_dir / "dashboard-flead-device-from-alert-link.png")
    expected = dashboard_db[dashboard_cfg.mongo.collections.predictions].count_documents(
        {"device_id": device, "is_anomaly": True})
    assert number(chart(states, "Anomalies of the device")["text"]) == expected
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-test-chart-name="Alerts of the device"] tbody tr')
    assert rows and {row.find_element(By.CSS_SELECTOR, "a").text for row in rows} == {device}


def test_empty_collection_shows_no_rows_not_an_error(logged_in_browser, superset, dashboard_db, dashboard_cfg):
    dashboard_db[dashboard_cfg.mongo.collections.dead_letters].delete_many({})
    states = open_dashboard(logged_in_browser, superset, "flead-data-quality", 3)
    assert not [s for s in states if s["error"]], states
    assert number(chart(states, "Dead letters total")["text"]) == 0


def test_importing_twice_keeps_one_copy_of_everything(superset, dashboard_cfg):
    superset_server.import_bundle(dashboard_cfg)
    api = superset_server.api_session(dashboard_cfg)
    expected = {"dashboard": ("dashboard_title", bundle_yaml("dashboards")),
                "chart": ("slice_name", bundle_yaml("charts")),
                "dataset": ("table_name", bundle_yaml("datasets")),
                "database": ("database_name", bundle_yaml("databases"))}
    for kind, (title, items) in expected.items():
        listed = api.get(f"{superset}/api/v1/{kind}/", params={"q": "(page_size:100)"}).json()["result"]
        assert sorted(row[title] for row in listed) == sorted(item[title] for item in items), kind
