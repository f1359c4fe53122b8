"""The Superset dashboards, end to end: MongoDB documents -> Superset (bundle imported) -> headless Chromium.

Every dashboard of the bundle must render every chart without an error and with data; the fleet figures must
equal counts taken from the bucketed documents in MongoDB; numbers print to 3 significant figures; re-importing
the bundle must update in place, never duplicate. Screenshots (1600 px wide) go to ``artifacts/``.
"""
from __future__ import annotations

import re
import time

import pytest
import requests

from browser import (DASHBOARDS, LOGIN_REFUSED, NO_RESULTS, bundle_yaml, chart, expected_charts, log_in, number,
                     open_dashboard, open_device, open_every_tab, open_tab, screenshot, tabs, wait_for_charts)
from sample_documents import DEVICES
from visualization import superset_server

pytestmark = pytest.mark.e2e

DECIMAL = re.compile(r"\d+\.\d+")


def long_numbers(text: str) -> list[str]:
    """Decimal numbers in `text` printed with more than 3 significant figures (0.12345, 12.34; not 0.0123)."""
    return [n for n in DECIMAL.findall(text) if len(n.replace(".", "").lstrip("0")) > 3]


@pytest.fixture(scope="module")
def logged_in_browser(browser, superset, dashboard_cfg):
    log_in(browser, superset, superset_server.credentials(dashboard_cfg))
    return browser


def _open(browser, base, dashboard):
    if dashboard["slug"] == "flead-device":  # the drill-down shows one device's data: pick one
        return open_device(browser, base, DEVICES[-1])
    return open_dashboard(browser, base, dashboard["slug"], expected_charts(dashboard))


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=[d["slug"] for d in DASHBOARDS])
def test_dashboard_renders_every_chart_with_data_and_short_numbers(dashboard, logged_in_browser, superset,
                                                                   artifacts_dir):
    browser = logged_in_browser
    states = _open(browser, superset, dashboard)
    screenshot(browser, artifacts_dir / f"dashboard-{dashboard['slug']}.png")
    for tab in range(1, len(tabs(dashboard))):  # Superset draws a tab's charts when it is opened
        states += open_tab(browser, dashboard, tab)
        screenshot(browser, artifacts_dir / f"dashboard-{dashboard['slug']}-tab{tab + 1}.png")
    failed = {s["name"]: s["error"] for s in states if s["error"]}
    assert not failed, f"charts with errors on {dashboard['slug']}: {failed}"
    empty = [s["name"] for s in states if NO_RESULTS in s["text"]]
    assert not empty, f"charts without data on {dashboard['slug']}: {empty}"
    too_long = {s["name"]: long_numbers(s["text"]) for s in states if long_numbers(s["text"])}
    assert not too_long, f"numbers with more than 3 significant figures: {too_long}"


def test_fleet_figures_equal_mongodb_counts_of_the_bucketed_documents(logged_in_browser, superset, dashboard_store):
    fleet = next(d for d in DASHBOARDS if d["slug"] == "flead-fleet")
    states = open_every_tab(logged_in_browser, superset, fleet)
    readings = dashboard_store.count_readings("predictions")  # the n of every bucket document
    assert number(chart(states, "Readings scored")["text"]) == readings > 0
    assert number(chart(states, "Alerts total")["text"]) == dashboard_store.collection("alerts").count_documents({})
    assert number(chart(states, "Devices reporting")["text"]) == len(
        dashboard_store.collection("predictions").distinct("device_id"))
    assert number(chart(states, "Open incidents")["text"]) == dashboard_store.collection("incidents").count_documents(
        {"status": "open"})


def test_an_incident_device_link_opens_the_filtered_drilldown(logged_in_browser, superset, dashboard_store,
                                                              artifacts_dir):
    from selenium.webdriver.common.by import By

    browser = logged_in_browser
    fleet = next(d for d in DASHBOARDS if d["slug"] == "flead-fleet")
    open_dashboard(browser, superset, "flead-fleet", expected_charts(fleet))
    open_tab(browser, fleet, [t["title"] for t in tabs(fleet)].index("Incidents"))
    link = browser.find_element(By.CSS_SELECTOR,
                                '[data-test-chart-name="Incidents, newest first"] table a[href*="flead-device"]')
    device = link.text
    browser.get(link.get_attribute("href"))
    drilldown = next(d for d in DASHBOARDS if d["slug"] == "flead-device")
    states = wait_for_charts(browser, expected_charts(drilldown))
    screenshot(browser, artifacts_dir / "dashboard-flead-device-from-incident-link.png")
    assert not [s for s in states if s["error"]], states
    metric_values = chart(states, "Metric values of the device (mean per bucket)")
    assert metric_values["drawn"] and NO_RESULTS not in metric_values["text"]
    states = open_tab(browser, drilldown, 1)  # anomalies, incidents, drift and alerts
    expected = dashboard_store.collection("alerts").count_documents({"device_id": device})
    assert number(chart(states, "Anomalous readings of the device")["text"]) == expected
    rows = browser.find_elements(By.CSS_SELECTOR, '[data-test-chart-name="Alerts of the device"] tbody tr')
    assert rows and {row.find_element(By.CSS_SELECTOR, "a").text for row in rows} == {device}


def test_empty_collection_shows_no_rows_not_an_error(logged_in_browser, superset, dashboard_store):
    dashboard_store.collection("dead_letters").delete_many({})
    quality = next(d for d in DASHBOARDS if d["slug"] == "flead-data-quality")
    states = open_dashboard(logged_in_browser, superset, "flead-data-quality", expected_charts(quality))
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


def test_the_login_pages_event_beacon_cannot_undo_a_sign_in(superset, dashboard_cfg):
    """The login page's event beacon leaves with the anonymous cookie as the sign-in form is sent. Superset answered it
    with a redirect to the login page and a new cookie at each step, which replaced the signed-in cookie whenever it
    arrived last (a busy server reorders them). Now it is answered at once and sets no cookie
    (visualization/superset_sign_in_guard.py); a signed-in browser's beacon is still taken."""
    browser = requests.Session()
    login_page = browser.get(superset + "/login/", timeout=30)
    assert login_page.ok and "session" in browser.cookies  # the anonymous session with its CSRF token
    anonymous_cookie = browser.cookies["session"]
    token = re.search(r'id="csrf_token"[^>]*value="([^"]+)"', login_page.text)[1]  # the page's hidden form field
    login = superset_server.credentials(dashboard_cfg)
    signed_in = browser.post(superset + "/login/", timeout=30, allow_redirects=False, data={
        "username": login["username"], "password": login["password"], "csrf_token": token})
    assert signed_in.status_code == 302 and browser.cookies["session"] != anonymous_cookie
    beacon = superset + "/superset/log/?explode=events"
    late = requests.post(beacon, data={"events": "[]"}, timeout=30, allow_redirects=False,
                         cookies={"session": anonymous_cookie})
    assert late.status_code == 204 and "Set-Cookie" not in late.headers, late.headers
    assert browser.get(superset + "/api/v1/me/", timeout=30).json()["result"]["username"] == login["username"]
    assert browser.post(beacon, data={"events": "[]"}, timeout=30, allow_redirects=False).status_code == 200


def test_pages_load_nothing_from_outside_the_machine(superset):
    """Superset's own policy lets every page load a usage pixel from a third-party host; ours allows this server
    only."""
    policy = requests.get(superset + "/login/", timeout=30).headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";") if " " in d.strip())
    for directive in ("default-src", "img-src", "connect-src", "font-src", "style-src"):
        assert "http" not in directives[directive], (directive, directives[directive])


def test_the_login_page_says_a_password_was_refused_only_when_it_was(own_browser, superset, dashboard_cfg):
    """Superset's login page says "Invalid username or password" from a flag it leaves in sessionStorage at every
    submit: after a sign-in and "Log out" it said so too. The login page now removes that flag unless it follows a
    refused password, and leaves the rest of the browser's storage alone (visualization/superset_sign_in_guard.py)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, login = own_browser, superset_server.credentials(dashboard_cfg)

    def login_page_text() -> str:
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.ID, "password"))
        time.sleep(1)  # the message, when there is one, comes with the form
        return browser.find_element(By.TAG_NAME, "body").text

    log_in(browser, superset, login)
    browser.execute_script("localStorage.setItem('flead-test', 'kept')")
    browser.get(superset + "/logout/")
    assert LOGIN_REFUSED not in login_page_text()
    assert browser.execute_script("return localStorage.getItem('flead-test')") == "kept"
    for field, value in (("username", login["username"]), ("password", "not-" + login["password"])):
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(browser, 60).until(lambda b: LOGIN_REFUSED in b.find_element(By.TAG_NAME, "body").text)
    log_in(browser, superset, login)
    assert "/login" not in browser.current_url
