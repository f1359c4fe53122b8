"""`flead report` on documents written through the Store: every section, embedded plots, the right F1."""
import html
import random
import re

import pytest

from orchestration import report

pytestmark = pytest.mark.integration

DEVICES = ["dev-a", "dev-b", "dev-c"]
READINGS_PER_DEVICE = 120
START_MS = 1_706_659_200_000


def _predictions(seed: int = 7) -> list[dict]:
    """Labelled scores with one anomalous stretch per device, some caught, some missed, some false alarms."""
    rng = random.Random(seed)
    records = []
    for d, device in enumerate(DEVICES):
        anomalous = range(60 + 10 * d, 75 + 10 * d)
        for seq in range(READINGS_PER_DEVICE):
            label = int(seq in anomalous)
            score = (2.0 + rng.random()) * (1 + d) if label and rng.random() < 0.7 else rng.random() * (1 + d)
            threshold = 1.0 * (1 + d)
            records.append({"device_id": device, "seq": seq, "ts": START_MS + seq * 1000, "score": score,
                            "threshold": threshold, "is_anomaly": score > threshold or rng.random() < 0.02,
                            "top_metrics": [{"metric": "m00", "share": 1.0}], "model_version": 1,
                            "global_version": 1 if seq < 50 else 2, "label": label,
                            "scored_at": START_MS + seq * 1000 + 300})
    return records


def _table_row(page: str, first_cell: str) -> list[str]:
    match = re.search(rf"<tr><td>{re.escape(first_cell)}</td>(.*?)</tr>", page)
    assert match, f"no table row starting with {first_cell!r}"
    return [first_cell] + [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", match.group(1))]


def test_report_shows_every_section_with_plots_and_the_streams_f1(cfg, store, tmp_path):
    records = _predictions()
    store.write_scores(records)
    store.write_metrics([{"_id": "2:fleet:", "model_version": 2, "model": "ae", "scope": "fleet",
                          "device_id": None, "f1": 0.61, "roc_auc": 0.87, "pr_auc": 0.55,
                          "created_at": START_MS + 200_000}])
    store.write_aggregation_round({
        "round_id": "r2", "version": 2, "strategy": "fedavg", "n_participants": 2, "n_rejected": 1,
        "participants": ["dev-a", "dev-b"], "rejected": [{"device_id": "dev-c", "reason": "non-finite weights"}],
        "started_at": START_MS + 50_000, "finished_at": START_MS + 52_000, "duration_s": 2.0})
    store.write_dead_letters([{"source": "flead.telemetry", "reason": "missing field 'ts'", "raw": "{}",
                               "device_id": None, "at": START_MS + 1}])
    store.write_incidents([_incident("dev-a", 60, 74, 3.2, "resolved"), _incident("dev-b", 70, 84, 9.5, "open"),
                           *(_incident("dev-c", seq, seq, 1.1, "resolved") for seq in range(0, 100, 4))])
    store.write_drift_events([{"event_id": "dev-c:90", "device_id": "dev-c", "seq": 90, "ts": START_MS + 90_000,
                               "reason": "more than 4 of 72 readings flagged in each of the last 4 blocks",
                               "flag_rate": 0.25, "target_rate": 0.01, "window": 288, "detected_at": START_MS,
                               "model_version": 1}])

    out = report.write_report(store, tmp_path / "report.html", n_devices=2)

    page = out.read_text()
    for heading in ("Score traces", "Accuracy against labels", "Quality per global model version", "Throughput",
                    "Incidents", "Drift events", "Federated rounds", "Dead letters"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count("src='data:image/png;base64,") == 2  # traces and throughput
    tp = sum(r["is_anomaly"] and r["label"] == 1 for r in records)
    flagged = sum(r["is_anomaly"] for r in records)
    anomalous = sum(r["label"] for r in records)
    precision, recall = tp / flagged, tp / anomalous
    overall = _table_row(page, "all devices")
    assert overall[report.ACCURACY_HEADERS.index("F1")] == f"{2 * precision * recall / (precision + recall):.3f}"
    assert overall[report.ACCURACY_HEADERS.index("labelled points")] == str(len(records))
    assert _table_row(page, "2")[:5] == ["2", "ae", "fleet", "1", "0.610"]  # metrics: version, model, scope, docs, F1
    assert _table_row(page, "v2")[1] == str(sum(r["global_version"] == 2 for r in records))
    assert "dev-c: non-finite weights" in page
    assert _table_row(page, "missing field &#x27;ts&#x27;")[1] == "1"
    # incidents: counted, the strongest first (at most report.SHOWN_INCIDENTS), with their metrics to blame
    assert "27 incident(s) on 3 device(s), 1 open; the 20 with the highest peak" in page
    incidents = page[page.index("<h2>Incidents</h2>"):page.index("<h2>Drift events</h2>")]
    assert _table_row(incidents, "dev-b")[1:] == [report.utc(START_MS + 70_000), report.utc(START_MS + 84_000), "0",
                                                  "15", "9.500", "m01 66%, m04 5%", "open"]
    assert incidents.index("<td>dev-b</td>") < incidents.index("<td>dev-a</td>") < incidents.index("<td>dev-c</td>")
    assert incidents.count("<td>dev-c</td>") == report.SHOWN_INCIDENTS - 2
    drift = page[page.index("<h2>Drift events</h2>"):page.index("<h2>Federated rounds</h2>")]
    assert "1 drift event(s) on 1 device(s)" in drift
    assert _table_row(drift, "dev-c")[1:6] == [report.utc(START_MS + 90_000), "90", "0.250", "0.010", "288"]


def _incident(device: str, first: int, last: int, ratio: float, status: str) -> dict:
    return {"schema": "flead.incident/1", "incident_id": f"{device}:{first}", "device_id": device, "status": status,
            "start_seq": first, "end_seq": last, "start_ts": START_MS + first * 1000, "end_ts": START_MS + last * 1000,
            "n_flagged": last - first + 1, "n_readings": last - first + 1, "peak_score": 2 * ratio,
            "peak_ratio": ratio,
            "metrics_to_blame": [{"metric": "m01", "share": 0.66}, {"metric": "m04", "share": 0.05}],
            "model_version": 1, "global_version": 1, "updated_at": START_MS + last * 1000}


def test_report_says_so_when_nothing_is_stored_and_writes_markdown(cfg, store, tmp_path):
    out = report.write_report(store, tmp_path / "report.md", fmt="md")

    text = out.read_text()
    assert "## Accuracy against labels" in text
    assert "The `metrics` collection is empty" in text
    assert "No dead letters." in text
    assert "No incidents in `incidents` yet." in text and "No drift events" in text
    assert not list(tmp_path.glob("*.png"))
