"""Headless-browser helpers shared by the dashboard and demo tests: log in, wait for charts, read figures."""
from __future__ import annotations

import time

import pytest
import yaml

from config import PROJECT_ROOT
from visualization.bundle_archive import BUNDLE_DIR

CHART_TIMEOUT_S = 120
NO_RESULTS = "No results"  # Superset's empty state: "No results were returned for this query"
# One entry per chart in view (a chart of a tab not opened is hidden): its name, viz type, error text, whether it is
# still loading or drawn.
CHART_STATES_JS = """
return Array.from(document.querySelectorAll('[data-test="chart-grid-component"]'))
    .filter(chart => chart.offsetParent !== null).map(chart => {
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


def bundle_yaml(kind: str) -> list[dict]:
    return [yaml.safe_load(path.read_text()) for path in sorted((BUNDLE_DIR / kind).rglob("*.yaml"))]


DASHBOARDS = bundle_yaml("dashboards")


LOGIN_ATTEMPTS = 3
LOGIN_TIMEOUT_S = 60
LOGIN_FAILURE_SCREENSHOT = PROJECT_ROOT / "artifacts" / "login-failure.png"
LOGIN_REFUSED = "Invalid username or password"  # what Superset's login page says when it opens after an attempt
LOGIN_FIELDS_JS = "return ['username', 'password'].map(id => (document.getElementById(id) || {}).value)"


def log_in(browser, url: str, login: dict) -> None:
    """Sign in through Superset's login page, a React app. A CI run once stayed on /login for a minute and said no
    more: so the typed values are checked before the click (a form drawn again under our keystrokes loses them),
    a page still on /login is loaded again, up to LOGIN_ATTEMPTS times, and a failure names the page's URL and
    text and leaves a screenshot in artifacts/."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import WebDriverWait

    typed = [login["username"], login["password"]]
    for attempt in range(1, LOGIN_ATTEMPTS + 1):
        browser.get(url + "/login/")
        try:
            WebDriverWait(browser, LOGIN_TIMEOUT_S).until(
                lambda b: b.find_elements(By.ID, "password") or "/login" not in b.current_url)
            if "/login" not in browser.current_url:
                return  # signed in already (a slow answer to the previous attempt arrived)
            for field, value in zip(("username", "password"), typed):
                element = browser.find_element(By.ID, field)
                element.clear()
                element.send_keys(value)
            if browser.execute_script(LOGIN_FIELDS_JS) != typed:
                continue  # the form was drawn again under our keystrokes
            button = browser.find_element(By.CSS_SELECTOR, "button[type=submit]")
            button.click()
            # the form's page goes first (with a message an earlier attempt may have left on it)
            WebDriverWait(browser, LOGIN_TIMEOUT_S).until(staleness_of(button))
            WebDriverWait(browser, LOGIN_TIMEOUT_S).until(
                lambda b: "/login" not in b.current_url or LOGIN_REFUSED in b.find_element(By.TAG_NAME, "body").text)
            if "/login" not in browser.current_url:
                return
            break  # refused (the page says so whenever it opens after an attempt: see superset_sign_in_guard.py)
        except WebDriverException:  # includes a timeout, and a form element replaced while we used it
            continue
    page = browser.find_element(By.TAG_NAME, "body").text if browser.find_elements(By.TAG_NAME, "body") else ""
    LOGIN_FAILURE_SCREENSHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(LOGIN_FAILURE_SCREENSHOT))
    pytest.fail(f"could not log in to Superset in {attempt} attempt(s): still at {browser.current_url}; "
                f"the page says {' / '.join(page.splitlines())!r} (screenshot: {LOGIN_FAILURE_SCREENSHOT})")


def wait_for_charts(browser, expected: int, settle_s: float = 1.0, poll_s: float = 0.5) -> list[dict]:
    """Wait until all `expected` charts of the page are drawn or failed; their final states. `settle_s`: let the
    last animations finish (for a screenshot; a timing passes 0)."""
    deadline = time.monotonic() + CHART_TIMEOUT_S
    while True:
        states = browser.execute_script(CHART_STATES_JS)
        settled = len(states) == expected and all(
            s["error"] or (not s["loading"] and (s["drawn"] or NO_RESULTS in s["text"])) for s in states)
        if settled:
            time.sleep(settle_s)
            return browser.execute_script(CHART_STATES_JS)
        if time.monotonic() > deadline:
            pytest.fail(f"charts not drawn after {CHART_TIMEOUT_S} s: {states}")
        time.sleep(poll_s)


def chart(states: list[dict], name: str) -> dict:
    return next(s for s in states if s["name"] == name)


def number(text: str) -> int:
    return int(text.strip().replace(",", ""))


def screenshot(browser, path) -> None:
    """Screenshot of the whole page (the window is grown to the page's height first)."""
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1600, max(1200, height))
    browser.save_screenshot(str(path))


def tabs(dashboard: dict) -> list[dict]:
    """The dashboard's tabs (``{title, layout}``); one untitled tab for a dashboard without tabs."""
    return dashboard.get("tabs") or [{"title": None, "layout": dashboard["layout"]}]


def expected_charts(dashboard: dict, tab: int = 0) -> int:
    """How many charts the layout places on a tab (default the first: what a dashboard shows when opened)."""
    return sum(len(row["charts"]) for row in tabs(dashboard)[tab]["layout"])


def open_tab(browser, dashboard: dict, tab: int, **wait) -> list[dict]:
    """Click a tab of the open dashboard and wait until all of its charts are drawn or failed."""
    from selenium.webdriver.common.by import By

    title = tabs(dashboard)[tab]["title"]
    [element] = [e for e in browser.find_elements(By.CSS_SELECTOR, '[role="tab"]') if e.text.strip() == title]
    element.click()
    return wait_for_charts(browser, expected_charts(dashboard, tab), **wait)


def open_dashboard(browser, base_url: str, slug: str, expected: int, **wait) -> list[dict]:
    """Open a dashboard standalone with every chart in view, and wait until all are drawn or failed."""
    browser.set_window_size(1600, 2400)  # Superset draws charts only when visible
    browser.get(f"{base_url}/superset/dashboard/{slug}/?standalone=1")
    return wait_for_charts(browser, expected, **wait)


def device_url(base_url: str, device: str) -> str:
    """The device drill-down with its device filter set (as the device links of the tables open it)."""
    return (f"{base_url}/superset/dashboard/flead-device/?standalone=1&native_filters=(NATIVE_FILTER-flead-device:"
            f"(extraFormData:(filters:!((col:device_id,op:IN,val:!('{device}')))),filterState:(value:!('{device}'))))")


def open_device(browser, base_url: str, device: str, **wait) -> list[dict]:
    """Open the drill-down of one device and wait until every chart is drawn or failed."""
    browser.set_window_size(1600, 2400)
    browser.get(device_url(base_url, device))
    drilldown = next(d for d in DASHBOARDS if d["slug"] == "flead-device")
    return wait_for_charts(browser, expected_charts(drilldown), **wait)


def open_every_tab(browser, base_url: str, dashboard: dict, device: str | None = None, **wait) -> list[dict]:
    """Open a dashboard (the drill-down on `device`), then each of its further tabs; the chart states of all tabs."""
    if dashboard["slug"] == "flead-device":
        states = open_device(browser, base_url, device, **wait)
    else:
        states = open_dashboard(browser, base_url, dashboard["slug"], expected_charts(dashboard), **wait)
    for tab in range(1, len(tabs(dashboard))):
        states += open_tab(browser, dashboard, tab, **wait)
    return states
