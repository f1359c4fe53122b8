"""The dashboard bundle as code, without Superset: references, UUIDs, placeholders, the database URI."""
from __future__ import annotations

import io
import zipfile

import yaml

from config import load_config
from visualization.bundle_archive import (ARCHIVE_ROOT, PLACEHOLDER, build_bundle_zip, bundle_files,
                                          mongo_sqlalchemy_uri)


def _parsed(cfg) -> dict[str, dict]:
    return {rel: yaml.safe_load(text) for rel, text in bundle_files(cfg).items()}


def test_every_reference_resolves_and_every_uuid_is_unique():
    files = _parsed(load_config(env={}))
    uuids = [doc["uuid"] for rel, doc in files.items() if rel != "metadata.yaml"]
    assert len(uuids) == len(set(uuids))
    by_kind = {kind: {doc["uuid"] for rel, doc in files.items() if rel.startswith(kind)}
               for kind in ("databases", "datasets", "charts")}
    for rel, doc in files.items():
        if rel.startswith("datasets/"):
            assert doc["database_uuid"] in by_kind["databases"], rel
            assert doc["sql"].lstrip().upper().startswith("SELECT "), f"{rel}: datasets must be virtual"
        if rel.startswith("charts/"):
            assert doc["dataset_uuid"] in by_kind["datasets"], rel
    placed = [item["meta"]["uuid"] for rel, doc in files.items() if rel.startswith("dashboards/")
              for item in doc["position"].values() if isinstance(item, dict) and item["type"] == "CHART"]
    assert sorted(placed) == sorted(by_kind["charts"]), "every chart on exactly one dashboard"


def test_collection_names_and_database_come_from_the_config():
    cfg = load_config(env={"FLEAD_MONGO_COLLECTIONS_ALERTS": "alerts_x", "FLEAD_MONGO_DATABASE": "fleet_db",
                           "FLEAD_MONGO_URI": "mongodb://u:p@db.example:27018/?authSource=admin&mode=x"})
    files = bundle_files(cfg)
    assert "FROM alerts_x" in files["datasets/flead_mongodb/alerts.yaml"]
    assert not [rel for rel, text in files.items() if PLACEHOLDER.search(text)]  # Superset's own Jinja stays
    assert mongo_sqlalchemy_uri(cfg) == "mongodb://u:p@db.example:27018/fleet_db?authSource=admin&mode=superset"
    assert yaml.safe_load(files["databases/flead_mongodb.yaml"])["sqlalchemy_uri"] == mongo_sqlalchemy_uri(cfg)


def test_zip_holds_the_bundle_under_one_root_folder():
    cfg = load_config(env={})
    with zipfile.ZipFile(io.BytesIO(build_bundle_zip(cfg))) as archive:
        names = archive.namelist()
    assert f"{ARCHIVE_ROOT}/metadata.yaml" in names
    assert all(name.startswith(ARCHIVE_ROOT + "/") for name in names)
    assert len(names) == len(bundle_files(cfg))


TIME_SERIES_LINES = ("echarts_timeseries_line", "mixed_timeseries")  # (a step chart of versions holds its value)
# Number formats that print at most 3 significant figures (or whole counts; `~`: without trailing zeros).
SHORT_FORMATS = {",d", "SMART_NUMBER", ".3r", ".3~r", ".3p", "~g"}


def test_lines_over_time_leave_gaps_and_numbers_are_short():
    files = _parsed(load_config(env={}))
    datasets = {doc["uuid"]: doc for rel, doc in files.items() if rel.startswith("datasets/")}
    for rel, doc in files.items():
        if rel.startswith("charts/"):
            params = doc["params"]
            temporal = {c["column_name"] for c in datasets[doc["dataset_uuid"]]["columns"] if c.get("is_dttm")}
            if doc["viz_type"] in TIME_SERIES_LINES and params.get("x_axis") in temporal:
                assert params.get("resample_method") == "asfreq", f"{rel}: a gap would be drawn as a line"
            for key in ("y_axis_format",):
                assert params.get(key, ",d") in SHORT_FORMATS, f"{rel}: {key} {params[key]}"
            for column, config in (params.get("column_config") or {}).items():
                assert config["d3NumberFormat"] in SHORT_FORMATS, f"{rel}: {column}"
        if rel.startswith("datasets/"):
            for metric in doc.get("metrics", []):
                assert metric.get("d3format", ",d") in SHORT_FORMATS, f"{rel}: {metric['metric_name']}"
                # (an unquoted expression with a comma splits into a stray key Superset's import refuses)
                assert set(metric) <= {"metric_name", "verbose_name", "expression", "d3format"}, f"{rel}: {metric}"


def test_a_first_tab_holds_what_an_operator_looks_at_first_and_other_tabs_are_placed_under_theirs():
    dashboards = {doc["slug"]: doc for rel, doc in _parsed(load_config(env={})).items() if rel.startswith("dashboards/")}
    for doc in dashboards.values():
        position = doc["position"]
        for item in position.values():
            if isinstance(item, dict) and item["type"] == "CHART":  # each chart under its row, tab and root
                assert all(parent in position for parent in item["parents"]) and item["parents"][0] == "ROOT_ID"
                assert item["id"] in position[item["parents"][-1]]["children"]
    fleet = dashboards["flead-fleet"]["position"]
    first_tab = fleet[fleet["TABS_ID"]["children"][0]]
    first = {fleet[chart]["meta"]["sliceName"] for row in first_tab["children"] for chart in fleet[row]["children"]}
    assert first == {"Open incidents", "Fleet anomaly rate over time", "Top devices by anomalous readings",
                     "Incidents timeline (the 25 devices with the newest incidents)"}


def test_scores_are_drawn_on_a_log_scale_beside_their_threshold():
    """An anomaly can score a thousand times its threshold: on a linear axis the threshold and every other score
    lie flat on zero (seen on the demo's drill-down)."""
    charts = [doc for rel, doc in _parsed(load_config(env={})).items() if rel.startswith("charts/")
              and "max_threshold" in doc["params"].get("metrics", [])]
    assert charts
    for doc in charts:
        assert doc["params"].get("logAxis") is True, doc["slice_name"]
        assert "log scale" in doc["slice_name"]


def test_the_incidents_paged_column_is_the_routers_rule():
    """The dashboards' "paged" column says what the router sends (`worth_notifying`), for any configured rule."""
    import sqlite3

    from monitoring.notifications import worth_notifying

    for min_flagged, critical in ((2, 3.0), (1, 3.0), (3, 1.5)):
        cfg = load_config(env={"FLEAD_ROUTER_NOTIFY_MIN_FLAGGED": str(min_flagged),
                               "FLEAD_ROUTER_CRITICAL_RATIO": str(critical)})
        dataset = _parsed(cfg)["datasets/flead_mongodb/incidents.yaml"]
        expression = next(c["expression"] for c in dataset["columns"] if c["column_name"] == "paged")
        db = sqlite3.connect(":memory:")
        db.execute("CREATE TABLE incidents (status TEXT, n_flagged INTEGER, peak_ratio REAL)")
        cases = [(status, n, ratio) for status in ("open", "resolved") for n in (1, 2, 3, 5)
                 for ratio in (None, 1.01, 1.5, 2.99, 3.0, 40.0)]
        db.executemany("INSERT INTO incidents VALUES (?, ?, ?)", cases)
        shown = db.execute(f"SELECT status, n_flagged, peak_ratio, {expression} FROM incidents").fetchall()
        for status, n, ratio, paged in shown:
            sent = worth_notifying({"n_flagged": n, "peak_ratio": ratio}, min_flagged, critical)
            assert paged == ("yes" if sent else "not yet" if status == "open" else "no"), (min_flagged, critical, n,
                                                                                          ratio, status)
