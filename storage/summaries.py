"""Summaries: small documents the dashboards' first tabs read by ``_id``, kept up to date as data is stored.

The embedded server (FerretDB v1.24, SQLite) evaluates a filter other than ``{_id: <string>}`` by decoding every
document of the collection in Go (~10,000 documents/s); an ``_id`` filter is handed to SQLite, which still scans
the table (FerretDB's ``_id`` index is on another expression than its query) but only parses JSON: ~30x cheaper,
yet in proportion to the collection's bytes. So a chart that reads one document of a small collection costs
almost nothing, whatever the fleet stored.

    collection       _id          written by                          fields
    fleet_summary    "fleet"      each roll-up generation             generation, series [{ts, n, anomalies}]
                                  (`BucketWriter._emit`)              (fleet_rollups buckets of the newest
                                                                      rollups.recent_s of event time), devices
                                                                      [{device_id, n, anomalies}] (the
                                                                      rollups.summary_devices devices with the
                                                                      most anomalous readings over the daily
                                                                      roll-ups kept, ranked)
    fleet_summary    "incidents"  each incidents write                open [incident ids], open_incidents, newest
                                  (`Store.store_incidents`)           [the rollups.timeline_incidents newest
                                                                      incidents by start of the
                                                                      rollups.timeline_devices devices with the
                                                                      newest: timeline fields]
    device_summary   <device_id>  each roll-up generation with        generation, scores [{ts, n, anomalies,
                                  that device                         score_max, threshold_max,
                                                                      anomaly_score_max}] (score_rollups buckets),
                                                                      metrics [{ts, name, n, sum}]
                                                                      (metric_rollups buckets), the newest
                                                                      rollups.recent_s of the device's event time;
                                                                      n, anomalies: its totals over the daily
                                                                      roll-ups kept

All are derived data: `rebuild` recomputes them from the roll-ups and the incidents collection (when a writer
loads, after a prune that deleted any of `SOURCES`, after `rebuild_rollups`); between rebuilds each write
merges its own increment (pure functions below). The "fleet" document and each device's name the last generation
they hold, so a generation's roll-ups re-emitted after a crash are not counted twice. A device's summary is
replaced by a delete and an insert (an update scans the collection on the embedded server, per document): a
crash in between loses it until the writer loads again.

    >>> merge_series([{"ts": 0, "n": 2, "anomalies": 1}], {600: (3, 0), 0: (1, 1)}, horizon_ms=600)
    [{'ts': 0, 'n': 3, 'anomalies': 2}, {'ts': 600, 'n': 3, 'anomalies': 0}]
    >>> merge_series([{"ts": 0, "n": 2, "anomalies": 1}], {1200: (1, 0)}, horizon_ms=600)
    [{'ts': 1200, 'n': 1, 'anomalies': 0}]
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Iterable, Mapping

from config import Config
from storage.rollups import merged

FLEET_ID = "fleet"
INCIDENTS_ID = "incidents"
KEY_FIELDS = ("ts", "name", "device_id")
TIMELINE_FIELDS = ("incident_id", "device_id", "status", "start_ts", "end_ts", "n_flagged", "peak_ratio")
# what prune() deleting from these collections changes in the summaries
SOURCES = ("fleet_rollups", "daily_rollups", "incidents")


def combine(a: dict, b: dict) -> dict:
    """Two entries of one bucket as one: counts and sums added, maxima (``*_max``) kept; None = no value."""
    out = dict(a)
    for name, value in b.items():
        if name in KEY_FIELDS or value is None:
            continue
        old = out.get(name)
        out[name] = value if old is None else max(old, value) if name.endswith("_max") else old + value
    return out


def merge_entries(entries: Iterable[dict], added: Iterable[dict], key: tuple[str, ...] = ("ts", "name"),
                  horizon_ms: int | None = None) -> list[dict]:
    """Entries (dicts with the `key` fields) with `added` combined into them (`combine`), sorted by key; with
    `horizon_ms`, only those within it of the newest ``ts``."""
    merged: dict[tuple, dict] = {}
    for entry in (*entries, *added):
        k = tuple(entry.get(f, "") for f in key)
        merged[k] = combine(merged[k], entry) if k in merged else {f: v for f, v in entry.items() if v is not None}
    out = [merged[k] for k in sorted(merged)]
    if horizon_ms is not None and out:
        oldest = max(e["ts"] for e in out) - horizon_ms
        out = [e for e in out if e["ts"] >= oldest]
    return out


def merge_series(series: list[dict], stats: Mapping[int, tuple[int, int]], horizon_ms: int) -> list[dict]:
    """Fleet buckets ``{ts, n, anomalies}`` with `stats` (bucket start -> (readings, anomalous)) added, in time
    order, only those within `horizon_ms` of the newest bucket."""
    added = [{"ts": ts, "n": n, "anomalies": a} for ts, (n, a) in stats.items()]
    return merge_entries(series, added, ("ts",), horizon_ms)


def rank_devices(devices: Iterable[dict], keep: int) -> list[dict]:
    """The `keep` first of ``{device_id, n, anomalies}`` entries by most anomalous readings, then most readings,
    then name; a device without readings in the roll-ups kept is not ranked."""
    return sorted((e for e in devices if e["n"] > 0), key=lambda e: (-e["anomalies"], -e["n"], e["device_id"]))[:keep]


def merge_devices(ranked: list[dict], totals: Mapping[str, tuple[int, int]], keep: int) -> list[dict]:
    """The `keep` first devices (`rank_devices`) of `ranked` with the new `totals` (device -> (readings,
    anomalous) over the roll-ups kept) of the devices a generation has. Exact while totals only grow (a prune
    rebuilds): a device neither ranked nor in `totals` cannot have passed the last one ranked. The fleet summary
    stays one bounded document however many devices there are (a document is limited to 16 MB)."""
    merged = {e["device_id"]: e for e in ranked}
    merged.update({d: {"device_id": d, "n": n, "anomalies": a} for d, (n, a) in totals.items()})
    return rank_devices(merged.values(), keep)


def timeline_entry(incident: dict) -> dict:
    """The fields of an incident the fleet overview's timeline shows."""
    return {k: incident.get(k) for k in TIMELINE_FIELDS}


def merge_incidents(summary: dict, written: Iterable[dict], keep: int, devices: int) -> dict:
    """The "incidents" summary after storing `written` (each the newest state of its incident, as
    `Store.replace_newer` wrote them): open ids added or removed, and for the timeline the `keep` newest incidents
    by start of the `devices` devices whose incidents started last (a timeline of more devices than that has no
    room for their names)."""
    open_ids = set(summary.get("open", ()))
    newest = {e["incident_id"]: e for e in summary.get("newest", ())}
    for doc in written:
        entry = timeline_entry(doc)
        (open_ids.add if entry["status"] == "open" else open_ids.discard)(entry["incident_id"])
        newest[entry["incident_id"]] = entry
    ordered = sorted(newest.values(), key=lambda e: (e["start_ts"], e["incident_id"]), reverse=True)
    shown = set(list(dict.fromkeys(e["device_id"] for e in ordered))[:devices])
    kept = [e for e in ordered if e["device_id"] in shown][:keep]
    return {"_id": INCIDENTS_ID, "open": sorted(open_ids), "open_incidents": len(open_ids), "newest": kept}


def generation_stats(stats: Mapping[str, Mapping[tuple, dict]]) -> dict[int, tuple[int, int]]:
    """From a `RollupAccumulator`'s stats: fleet bucket -> (n, anomalies)."""
    return {bucket: (s["n"], s["anomalies"]) for (_, bucket), s in stats.get("fleet_rollups", {}).items()}


SCORE_ENTRY_FIELDS = ("n", "anomalies", "score_max", "threshold_max", "anomaly_score_max")


def device_entries(stats: Mapping[str, Mapping[tuple, dict]]) -> dict[str, dict[str, list[dict]]]:
    """From a `RollupAccumulator`'s stats: per device, its score entries ``{ts, n, anomalies, score_max,
    threshold_max, anomaly_score_max}`` (score_rollups buckets), metric entries ``{ts, name, n, sum}``
    (metric_rollups buckets) and ``totals`` [n, anomalies] (daily_rollups)."""
    out: dict[str, dict] = defaultdict(lambda: {"scores": [], "metrics": [], "totals": [0, 0]})
    for (device, _), st in stats.get("daily_rollups", {}).items():
        out[device]["totals"][0] += st["n"]
        out[device]["totals"][1] += st["anomalies"]
    for (device, ts), st in stats.get("score_rollups", {}).items():
        out[device]["scores"].append({"ts": ts, **{f: st.get(f) for f in SCORE_ENTRY_FIELDS}})
    for (device, ts), st in stats.get("metric_rollups", {}).items():
        out[device]["metrics"] += [{"ts": ts, "name": name, "n": n, "sum": total}
                                   for name, (n, total) in st["metrics"].items()]
    return dict(out)


def device_document(device: str, old: dict, added: dict, generation: int, horizon_ms: int) -> dict:
    """A device's summary: its `old` entries with `added` merged, the newest `horizon_ms` of event time."""
    return {"_id": device, "generation": generation, "updated_at": _now_ms(),
            "n": old.get("n", 0) + added["totals"][0], "anomalies": old.get("anomalies", 0) + added["totals"][1],
            "scores": merge_entries(old.get("scores", []), added["scores"], ("ts",), horizon_ms),
            "metrics": merge_entries(old.get("metrics", []), added["metrics"], ("ts", "name"), horizon_ms)}


def _horizon_ms(cfg: Config) -> int:
    return int(cfg.rollups.recent_s * 1000)


def _now_ms() -> int:
    return int(time.time() * 1000)


def update_fleet(store, stats: Mapping[str, Mapping[tuple, dict]], generation: int,
                 totals: Mapping[str, tuple[int, int]]) -> bool:
    """Add one roll-up generation (a `RollupAccumulator`'s stats, and the new totals of its devices from
    `update_devices`) to the "fleet" summary, unless it holds that generation already; returns whether it wrote."""
    doc = store.collection("fleet_summary").find_one({"_id": FLEET_ID}) or {}
    if doc.get("generation", 0) >= generation:
        return False
    store.upsert("fleet_summary", [{
        "_id": FLEET_ID, "generation": generation, "updated_at": _now_ms(),
        "series": merge_series(doc.get("series", []), generation_stats(stats), _horizon_ms(store.cfg)),
        "devices": merge_devices(doc.get("devices", []), totals, store.cfg.rollups.summary_devices)}])
    return True


def update_devices(store, stats: Mapping[str, Mapping[tuple, dict]], generation: int) -> dict[str, tuple[int, int]]:
    """Add one roll-up generation to the summaries of the devices it has (one read of the collection, one
    delete, one insert, not an update per device: the embedded server scans the collection for each update);
    devices whose summary holds that generation already are skipped. Returns the totals (n, anomalies) of every
    device of the generation, for `update_fleet`."""
    entries = device_entries(stats)
    if not entries:
        return {}
    old = {d["_id"]: d for d in store.find("device_summary", {"_id": {"$in": sorted(entries)}})}
    docs = [device_document(device, old.get(device, {}), added, generation, _horizon_ms(store.cfg))
            for device, added in sorted(entries.items()) if old.get(device, {}).get("generation", 0) < generation]
    replaced = [d["_id"] for d in docs if d["_id"] in old]
    if replaced:
        store.collection("device_summary").delete_many({"_id": {"$in": replaced}})
    store.insert_new("device_summary", docs)
    written = {d["_id"]: d for d in docs}
    return {device: _totals(written.get(device) or old[device]) for device in entries}


def _totals(doc: dict) -> tuple[int, int]:
    return doc.get("n", 0), doc.get("anomalies", 0)


def update_incidents(store, written: list[dict]) -> None:
    """Merge incident states just stored into the "incidents" summary."""
    if not written:
        return
    doc = store.collection("fleet_summary").find_one({"_id": INCIDENTS_ID}) or {}
    summary = merge_incidents(doc, written, store.cfg.rollups.timeline_incidents,
                              store.cfg.rollups.timeline_devices)
    store.upsert("fleet_summary", [summary | {"updated_at": _now_ms()}])


def _summed(docs: Iterable[dict], key: str) -> dict:
    out: dict = defaultdict(lambda: [0, 0])
    for d in docs:
        out[d[key]][0] += d["n"]
        out[d[key]][1] += d["anomalies"]
    return {k: tuple(v) for k, v in out.items()}


def rebuild(store) -> None:
    """Recompute both summaries from the roll-ups and the incidents stored."""
    from storage.writer import ROLLUP_STATE  # (storage.writer imports this module)

    generation = store.sink_state(ROLLUP_STATE).get("emitted_through", 0)
    fleet = store.find("fleet_rollups", None, ("ts", "n", "anomalies"))
    incidents = store.find("incidents", None, TIMELINE_FIELDS)
    stats = {}
    for key, source in (("daily_rollups", "scores"), ("score_rollups", "scores"), ("metric_rollups", "readings")):
        partials = defaultdict(list)  # one per generation until the sink compacts them
        for doc in store.find(key):
            partials[(doc["device_id"], doc["ts"])].append(doc)
        stats[key] = {group: merged(docs, source) for group, docs in partials.items()}
    devices = [device_document(device, {}, added, generation, _horizon_ms(store.cfg))
               for device, added in sorted(device_entries(stats).items())]
    now = _now_ms()
    store.upsert("fleet_summary", [
        {"_id": FLEET_ID, "generation": generation, "updated_at": now,
         "series": merge_series([], _summed(fleet, "ts"), _horizon_ms(store.cfg)),
         "devices": rank_devices(({"device_id": d["_id"], "n": d["n"], "anomalies": d["anomalies"]}
                                  for d in devices), store.cfg.rollups.summary_devices)},
        merge_incidents({}, incidents, store.cfg.rollups.timeline_incidents,
                        store.cfg.rollups.timeline_devices) | {"updated_at": now}])
    store.collection("device_summary").delete_many({})
    store.insert_new("device_summary", devices)


__all__ = ["FLEET_ID", "INCIDENTS_ID", "SOURCES", "merge_devices", "merge_incidents", "merge_series", "rank_devices",
           "rebuild", "timeline_entry", "update_fleet", "update_incidents"]
