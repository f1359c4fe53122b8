"""First load of each Superset dashboard in headless Chromium, with an empty database and with N readings stored.

    .venv/bin/python bench/dashboards.py [--quick] [--readings N] [--json OUT]

Starts its own MongoDB (FerretDB) and Superset (temporary state dir, free ports), imports the bundle, and times
how long each dashboard takes until every chart is drawn: first on an empty database (the floor: Superset's and
the browser's own cost), then after storing N readings of 100 devices, one a minute each (about a week), through
`storage.mongo.Store` as the sink stores them: bucketed telemetry (8 metrics) and score records, alerts, roll-ups,
and the incidents, drift events and dead letters such a stream has, with the summaries the first tabs read
(storage/summaries.py; the write time is a row too). The drill-down is timed with one device picked. The headline is the fleet overview at N (default 1,000,000; --quick 100,000).
Needs Superset and Chromium from `visualization/setup_superset.sh`.
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

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "tests" / "e2e"))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from browser import DASHBOARDS, expected_charts, log_in, open_dashboard, open_device  # noqa: E402  (the tests')
from config import load_config  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from storage.buckets import records_block  # noqa: E402
from storage.mongo import Store  # noqa: E402
from telemetry.schema import Columns  # noqa: E402
from visualization import superset_server  # noqa: E402

DEVICES = [f"dev-{i:03d}" for i in range(100)]
METRICS = tuple(f"m{i:02d}" for i in range(8))
READING_INTERVAL_MS = 60_000
START_MS = 1_767_225_600_000  # 2026-01-01
CHUNK_MINUTES = 500  # readings per device per write (a sink flush of 8 minutes of a 100-device fleet)
HEADLINE_DASHBOARD = "flead-fleet"
TIMING = {"settle_s": 0.0, "poll_s": 0.1}  # the clock stops when the last chart is drawn


def stream_chunks(n: int, seed: int = 1):
    """Score records, telemetry blocks, incidents and drift events of `n` readings, `CHUNK_MINUTES` at a time."""
    rng = np.random.default_rng(seed)
    per_device = n // len(DEVICES)
    burst = {d: 0 for d in DEVICES}
    open_run: dict[str, dict] = {}
    for start in range(0, per_device, CHUNK_MINUTES):
        seqs = np.arange(start, min(start + CHUNK_MINUTES, per_device))
        ts = START_MS + seqs * READING_INTERVAL_MS
        scores, blocks, incidents, drift = [], [], [], []
        for d, device in enumerate(DEVICES):
            values = np.sin(seqs[:, None] / (10 + np.arange(len(METRICS)))) + 0.1 * rng.random((len(seqs), len(METRICS)))
            threshold = 1.0 + 0.1 * np.sin(seqs / 300)
            flagged = np.zeros(len(seqs), dtype=bool)
            for i in range(len(seqs)):  # anomalies in runs: ~1 % of readings
                if not burst[device] and rng.random() < 0.002:
                    burst[device] = int(rng.integers(2, 8))
                flagged[i], burst[device] = burst[device] > 0, max(0, burst[device] - 1)
            score = np.where(flagged, threshold * (1.2 + rng.random(len(seqs))), threshold * rng.random(len(seqs)) * 0.9)
            values[flagged, 3] += 2.0
            blocks.append(Columns(device, METRICS, values, seqs.tolist(), ts.tolist(), [int(f) for f in flagged]))
            for i, seq in enumerate(seqs.tolist()):
                incident = None
                if flagged[i]:
                    run = open_run.get(device)
                    if run is None or seq - run["end_seq"] > 3:
                        if run is not None:
                            incidents.append({**run, "status": "resolved"})
                        run = open_run[device] = {"incident_id": f"{device}:{seq}", "device_id": device,
                                                  "start_seq": seq, "start_ts": int(ts[i]), "n_flagged": 0,
                                                  "peak_score": 0.0, "peak_ratio": 0.0}
                    run.update(end_seq=seq, end_ts=int(ts[i]) + READING_INTERVAL_MS, n_flagged=run["n_flagged"] + 1,
                               n_readings=seq - run["start_seq"] + 1, peak_score=max(run["peak_score"], float(score[i])),
                               peak_ratio=max(run["peak_ratio"], float(score[i] / threshold[i])),
                               metrics_to_blame=[{"metric": "m03", "share": 0.7}], model_version=1 + seq // 500,
                               global_version=seq // 1000, updated_at=int(ts[i]) + 300)
                    incident = run["incident_id"]
                scores.append({"device_id": device, "seq": seq, "ts": int(ts[i]), "score": float(score[i]),
                               "threshold": float(threshold[i]), "is_anomaly": bool(flagged[i]),
                               "top_metrics": [{"metric": "m03", "share": 0.7}], "model_version": 1 + seq // 500,
                               "global_version": seq // 1000, "label": int(flagged[i]), "scored_at": int(ts[i]) + 300,
                               "p_value": 0.5, "incident_id": incident})
            if rng.random() < 0.01:
                seq = int(seqs[-1])
                drift.append({"event_id": f"{device}:{seq}", "device_id": device, "seq": seq, "ts": int(ts[-1]),
                              "reason": "flag rate above target for the window", "flag_rate": 0.05,
                              "target_rate": 0.01, "window": 200, "detected_at": int(ts[-1]) + 500, "model_version": 2})
        yield scores, blocks, incidents + [{**r, "status": "open"} for r in open_run.values()], drift


def store_stream(store: Store, n: int) -> None:
    """Store `n` readings the way the sink does (see `stream_chunks`), plus a few dead letters."""
    for scores, blocks, incidents, drift in stream_chunks(n):
        by_device: dict[str, list[dict]] = {}
        for record in scores:
            by_device.setdefault(record["device_id"], []).append(record)
        store.writer.write(scores=[records_block(d, recs) for d, recs in by_device.items()], readings=blocks)
        store.writer.close_generation(force=True)
        store.write_incidents(incidents)
        store.write_drift_events(drift)
    rng = random.Random(2)
    store.write_dead_letters([{"source": "flead.telemetry", "reason": rng.choice(["not JSON", "missing field 'ts'"]),
                               "raw": "{", "device_id": None, "at": START_MS + i * 60_000} for i in range(200)])


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1200",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='flead-bench-chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


# The chart-data requests the page made so far: slice id (from the request's form_data) and seconds until answered.
CHART_REQUESTS_JS = """
return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/v1/chart/data'))
  .map(e => ({slice_id: JSON.parse(new URL(e.name).searchParams.get('form_data') || '{}').slice_id,
              s: e.duration / 1000}));
"""


def chart_names(cfg) -> dict[int, str]:
    """Superset's chart id -> chart name."""
    api = superset_server.api_session(cfg)
    listed = api.get(f"{superset_server.base_url(cfg)}/api/v1/chart/", params={"q": "(page_size:100)"}).json()
    return {row["id"]: row["slice_name"] for row in listed["result"]}


def chart_request_times(browser, names: dict[int, str]) -> dict[str, float]:
    """Chart name -> seconds its data request took on the page just loaded (requests run side by side, up to
    Superset's threads: a slow one waits for others)."""
    return {names.get(r["slice_id"], "(the device filter's choices)" if r["slice_id"] is None else str(r["slice_id"])):
            r["s"] for r in browser.execute_script(CHART_REQUESTS_JS)}


def load_times(browser, url: str, device: str, names: dict[int, str]) -> tuple[dict[str, float], dict[str, dict]]:
    """Seconds until every chart of each dashboard's first tab is drawn (an error in a chart fails the benchmark),
    and per dashboard the seconds of each chart's data request."""
    times, per_chart = {}, {}
    for dashboard in DASHBOARDS:
        started = time.monotonic()
        if dashboard["slug"] == "flead-device":
            states = open_device(browser, url, device, **TIMING)
        else:
            states = open_dashboard(browser, url, dashboard["slug"], expected_charts(dashboard), **TIMING)
        times[dashboard["slug"]] = time.monotonic() - started
        per_chart[dashboard["slug"]] = chart_request_times(browser, names)
        failed = [(s["name"], s["error"]) for s in states if s["error"]]
        if failed:
            raise RuntimeError(f"{dashboard['slug']}: charts failed: {failed}")
    return times, per_chart


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 readings instead of 1,000,000")
    parser.add_argument("--readings", type=int, default=None, help="readings to store (overrides --quick)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--screenshots", metavar="DIR", help="also save a screenshot of each dashboard with data here")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    n = args.readings or (100_000 if args.quick else 1_000_000)

    state_dir = Path(tempfile.mkdtemp(prefix="flead-bench-dashboards-"))
    env = {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_MONGO_PORT": str(processes.free_port()),
           "FLEAD_SUPERSET_PORT": str(processes.free_port()), "FLEAD_KAFKA_PORT": str(processes.free_port()),
           "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port())}
    cfg = load_config(env={**os.environ, **env})
    browser = None
    try:
        stack.start_mongo(cfg)
        with Store(cfg) as store:
            store.init()
            url = superset_server.start(cfg)
            browser = chromium()
            log_in(browser, url, superset_server.credentials(cfg))
            names = chart_names(cfg)
            empty, _ = load_times(browser, url, DEVICES[0], names)
            print(f"empty database: {', '.join(f'{k} {v:.1f} s' for k, v in empty.items())}", flush=True)
            started = time.monotonic()
            store_stream(store, n)
            write_s = time.monotonic() - started
            stored = store.count_readings()
            counts = {key: store.collection(key).count_documents({}) for key in (
                "predictions", "device_data", "alerts", "incidents", "score_rollups", "metric_rollups",
                "daily_rollups", "fleet_rollups", "device_summary")}
            print(f"stored {stored:,} readings (scores and telemetry) in {write_s:.1f} s; documents: {counts}",
                  flush=True)
            full, full_charts = load_times(browser, url, DEVICES[0], names)
            if args.screenshots:  # look at what was timed
                from browser import screenshot

                Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                for dashboard in DASHBOARDS:
                    if dashboard["slug"] == "flead-device":
                        open_device(browser, url, DEVICES[0])
                    else:
                        open_dashboard(browser, url, dashboard["slug"], expected_charts(dashboard))
                    screenshot(browser, Path(args.screenshots) / f"{dashboard['slug']}.png")
            again, _ = load_times(browser, url, DEVICES[0], names)
    finally:
        if browser is not None:
            browser.quit()
        superset_server.stop(cfg)
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)

    rows = [{"name": f"store {stored:,} readings: telemetry, scores, alerts, incidents, roll-ups",
             "value": round(write_s, 1), "unit": "s"}]
    for slug in empty:
        rows.append({"name": f"{slug}: first load, empty database", "value": round(empty[slug], 1), "unit": "s"})
        rows.append({"name": f"{slug}: first load, {stored:,} readings", "value": round(full[slug], 1), "unit": "s"})
        rows.append({"name": f"{slug}: second load, {stored:,} readings", "value": round(again[slug], 1), "unit": "s"})
        for name, seconds in sorted(full_charts[slug].items(), key=lambda item: -item[1]):
            rows.append({"name": f"  {slug} first load, chart data request: {name}"[:90], "value": round(seconds, 1),
                         "unit": "s"})
    print(f"{'measure':<90} {'value':>8}  unit")
    for row in rows:
        print(f"{row['name']:<90} {row['value']:>8}  {row['unit']}")
    write_json(args.json, {
        "headline": {"name": f"{HEADLINE_DASHBOARD} first load with {stored:,} readings stored", "unit": "s",
                     "value": round(full[HEADLINE_DASHBOARD], 1), "floor": round(empty[HEADLINE_DASHBOARD], 1)},
        "rows": rows, "readings": stored, "documents": counts, "devices": len(DEVICES),
        "rollups": cfg.rollups.to_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
