"""First load of each Superset dashboard in headless Chromium, with an empty database and with N predictions.

    .venv/bin/python bench/dashboards.py [--quick] [--json OUT]

Starts its own MongoDB (FerretDB) and Superset (temporary state dir, free ports), imports the bundle, and times
how long each dashboard takes until every chart is drawn: first on an empty database (the floor: Superset's and
the browser's own cost), then after storing N score records of 12 devices, one reading a minute each, through
`storage.mongo.write_predictions` (as the sink does: predictions, alerts, score roll-ups; the write time is a row
too). The headline is the fleet overview at N. Needs Superset and Chromium from `visualization/setup_superset.sh`.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "e2e"))
from bench_output import write_json  # noqa: E402  (beside this script)
from browser import DASHBOARDS, expected_charts, log_in, open_dashboard  # noqa: E402  (the dashboard tests' helpers)
from config import load_config  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from storage import mongo  # noqa: E402
from visualization import superset_server  # noqa: E402

DEVICES = [f"dev-{i:02d}" for i in range(12)]
READING_INTERVAL_MS = 60_000
HEADLINE_DASHBOARD = "flead-fleet"


def score_records(n: int, seed: int = 1) -> list[dict]:
    """`n` score records, spread over `DEVICES`, ~3 % anomalous."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        device, seq = DEVICES[i % len(DEVICES)], i // len(DEVICES)
        ts = 1_700_000_000_000 + seq * READING_INTERVAL_MS
        anomaly = rng.random() < 0.03
        out.append({"device_id": device, "seq": seq, "ts": ts, "score": rng.random() + anomaly, "threshold": 1.0,
                    "is_anomaly": anomaly, "top_metrics": [{"metric": "m00", "share": 1.0}], "model_version": 1,
                    "global_version": 0, "label": int(anomaly), "scored_at": ts + 300})
    return out


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1200",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='flead-bench-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def load_times(browser, url: str) -> dict[str, float]:
    """Seconds until every chart of each dashboard is drawn (an error in a chart fails the benchmark)."""
    times = {}
    for dashboard in DASHBOARDS:
        started = time.monotonic()
        states = open_dashboard(browser, url, dashboard["slug"], expected_charts(dashboard))
        times[dashboard["slug"]] = time.monotonic() - started
        failed = [s["name"] for s in states if s["error"]]
        if failed:
            raise RuntimeError(f"{dashboard['slug']}: charts failed: {failed}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 predictions instead of 75,000")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args()
    n = 10_000 if args.quick else 75_000

    state_dir = Path(tempfile.mkdtemp(prefix="flead-bench-dashboards-"))
    env = {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_MONGO_PORT": str(processes.free_port()),
           "FLEAD_SUPERSET_PORT": str(processes.free_port()), "FLEAD_KAFKA_PORT": str(processes.free_port()),
           "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port())}
    cfg = load_config(env={**os.environ, **env})
    browser = None
    try:
        stack.start_mongo(cfg)
        db = mongo.connect(cfg)
        mongo.init_db(db, cfg)
        url = superset_server.start(cfg)
        browser = chromium()
        log_in(browser, url, superset_server.credentials(cfg))
        empty = load_times(browser, url)
        print(f"empty database: {', '.join(f'{k} {v:.1f} s' for k, v in empty.items())}", flush=True)
        records = score_records(n)
        started = time.monotonic()
        for i in range(0, n, 5_000):
            mongo.write_predictions(db, cfg, records[i:i + 5_000])
        write_s = time.monotonic() - started
        print(f"stored {n:,} predictions with their alerts and roll-ups in {write_s:.1f} s", flush=True)
        full = load_times(browser, url)
    finally:
        if browser is not None:
            browser.quit()
        superset_server.stop(cfg)
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)

    rows = [{"name": f"store {n:,} score records (predictions, alerts, roll-ups)", "value": round(write_s, 1),
             "unit": "s"}]
    for slug in empty:
        rows.append({"name": f"{slug}: first load, empty database", "value": round(empty[slug], 1), "unit": "s"})
        rows.append({"name": f"{slug}: first load, {n:,} predictions", "value": round(full[slug], 1), "unit": "s"})
    print(f"{'measure':<60} {'value':>8}  unit")
    for row in rows:
        print(f"{row['name']:<60} {row['value']:>8}  {row['unit']}")
    write_json(args.json, {
        "headline": {"name": f"{HEADLINE_DASHBOARD} first load with {n:,} predictions", "unit": "s",
                     "value": round(full[HEADLINE_DASHBOARD], 1), "floor": round(empty[HEADLINE_DASHBOARD], 1)},
        "rows": rows, "predictions": n, "rollup_bucket_s": cfg.mongo.rollup_bucket_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
