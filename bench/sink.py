"""Kafka → sink → MongoDB: readings stored per second on the embedded server, beside a floor measured in the same run.

    .venv/bin/python bench/sink.py [--quick] [--json OUT]

Starts its own Kafka broker and MongoDB (FerretDB) in a temporary state dir on free ports. The input is what the
stream job writes for the ASD test set (12 devices × ``--copies`` under new ids, 19 metrics): per device,
16-reading telemetry messages and 16-record score batches (1 % anomalous, with incidents ids, top metrics and
p-values), signed as the devices and the stream job sign them (the sink verifies every one); a reading counts as stored when both its telemetry and its score are in MongoDB.

1. throughput: all messages preloaded (all 4,320 test readings of each device), `MongoSink`
   started; the headline is its steady state: readings stored (telemetry and scores counted apart, a reading is
   half of each) per second from the end of its first flush to the end (the roll-ups included), when the
   decoding processes, the storing thread and MongoDB all have work. Shown apart: the rate from its first
   partition assignment (gathering and decoding the first flush before anything is stored included), and the
   consumer group's start-up before that. Event times as a live stream of that rate has them (``live``), and as the
   ASD replay has them (``replay``: 5-minute spacing, so far more roll-up buckets);
2. floor: the documents the sink wrote (buckets, alerts, roll-ups), re-inserted with raw pymongo ``insert_many``
   (batches of ``mongo.write_batch_size``) into a fresh database: the server's own cost for the same documents;
3. lag: a producer process sends both topics paced at ``--rate`` readings/s (the stream job's speed) for
   ``--seconds`` while the sink runs; reported: readings not yet stored when the producer stops, and how long the
   sink then needs to catch up.
"""
from __future__ import annotations

import argparse
import multiprocessing
from itertools import zip_longest
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import stop_cleanly_on_sigterm, write_json  # noqa: E402  (beside this script)
from config import load_config  # noqa: E402
from orchestration import stack  # noqa: E402
from services import processes  # noqa: E402
from storage.mongo import Store  # noqa: E402
from storage.sink import MongoSink  # noqa: E402
from telemetry.readers import open_reader  # noqa: E402
from telemetry.schema import Reading, encode_batch, encode_scores  # noqa: E402
from models.integrity import sign_device_message, sign_message, signing_key  # noqa: E402

MESSAGE_READINGS = 16
LIVE_START_MS = 1_767_225_600_000
WRITTEN_KEYS = ("predictions", "device_data", "alerts", "score_rollups", "daily_rollups", "fleet_rollups",
                "metric_rollups")


def asd_devices(cfg, copies: int, per_device: int) -> dict[str, list[Reading]]:
    """ASD test readings per device, each device `copies` times under new ids."""
    base: dict[str, list[Reading]] = {}
    for r in open_reader("asd", cfg.data_dir / "asd/test.csv.gz"):
        if len(base.setdefault(r.device_id, [])) < per_device:
            base[r.device_id].append(r)
    return {f"{d}-x{c}": [Reading(f"{d}-x{c}", r.seq, r.ts, r.metrics, r.label) for r in rs]
            for c in range(copies) for d, rs in base.items()}


def messages(device: str, readings: list[Reading], seq0: int, ts0: int | None, ms_per_reading: float,
             rng: np.random.Generator, key: bytes) -> list[tuple[str, bytes, bytes]]:
    """(key, telemetry message, score message) of one device's readings, 16 at a time, signed (with the device's
    token and with `key`); ``ts0`` None keeps the readings' own timestamps, else they are
    ``ts0 + i * ms_per_reading`` (a live stream)."""
    out = []
    for start in range(0, len(readings), MESSAGE_READINGS):
        group = readings[start:start + MESSAGE_READINGS]
        shifted = [Reading(device, seq0 + start + i,
                           r.ts if ts0 is None else int(ts0 + (seq0 + start + i) * ms_per_reading), r.metrics, r.label)
                   for i, r in enumerate(group)]
        flagged = rng.random(len(group)) < 0.01
        scores = [{"seq": r.seq, "ts": r.ts, "score": float(0.5 + 2 * f), "threshold": 1.0, "is_anomaly": bool(f),
                   "p_value": 0.004 if f else 0.5, "incident_id": f"{device}:{r.seq}" if f else None,
                   "top_metrics": [{"metric": "m03", "share": 0.6}, {"metric": "m07", "share": 0.2}] if f else [],
                   "label": r.label} for r, f in zip(shifted, flagged)]
        out.append((device, sign_device_message(encode_batch(device, shifted), key, device),
                    sign_message(encode_scores(device, 3, 1, shifted[-1].ts + 50, scores), key)))
    return out


def produce_all(cfg, batches: list[tuple[str, bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "linger.ms": 20, "compression.type": "lz4",
                         "queue.buffering.max.messages": 2_000_000, "log_level": 3})
    for key, telemetry, scores in batches:
        while True:
            try:
                producer.produce(cfg.kafka.topics.telemetry, telemetry, key=key)
                producer.produce(cfg.kafka.topics.scores, scores, key=key)
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(120):
        raise RuntimeError("not every message was delivered")


def run_until_stored(cfg, expected: int, timeout_s: float = 1800.0) -> tuple[dict, MongoSink]:
    """Run a sink until `expected` readings have both telemetry and score stored. Returns its timings: seconds from
    start to its first partition assignment, from there to the end; readings stored (telemetry and scores counted
    apart: a reading is half of each, as a flush may store one without the other) and the time at the end of each
    flush; and the sink."""
    sink = MongoSink(cfg)
    started = time.monotonic()
    marks: dict = {"flushes": []}

    def done() -> bool:
        stored = min(sink.stats["predictions"], sink.stats["device_data"])
        if sink.stats["flushes"] > len(marks["flushes"]):
            marks["flushes"].append((time.monotonic(), (sink.stats["predictions"] + sink.stats["device_data"]) / 2))
        if stored >= expected:
            marks.setdefault("end", time.monotonic())
            return True
        return time.monotonic() - started > timeout_s

    sink.run(should_stop=done)
    end = marks.get("end", time.monotonic())
    assigned = sink.assigned_at or started
    return {"startup_seconds": assigned - started, "seconds": end - assigned,
            "flushes": [(round(t - assigned, 2), round(n)) for t, n in marks["flushes"]]}, sink


def rounded(value: float | None) -> int | None:
    """`value` rounded, None kept (no steady state measured)."""
    return None if value is None else round(value)


def steady_rate(flushes: list[tuple[float, float]], readings: int, seconds: float) -> float | None:
    """Readings/s from the end of the first flush to the end (`seconds` after assignment): start-up and gathering
    the first flush left out. The last flush's decoding overlaps the one before it, so this needs several flushes
    to mean a steady state: None with fewer than 3."""
    if len(flushes) < 3:
        return None
    at, stored = flushes[0]
    return (readings - stored) / (seconds - at)


def throughput(env: dict, devices: dict[str, list[Reading]], live_rate: float | None) -> dict:
    """Preload, then time a sink storing everything. ``live_rate``: readings/s of the live timestamps (None:
    the ASD replay's own)."""
    cfg = fresh(env, "live" if live_rate else "replay")
    rng = np.random.default_rng(1)
    per_device_ms = None if live_rate is None else 1000.0 * len(devices) / live_rate
    per_device = [messages(device, rs, 0, None if live_rate is None else LIVE_START_MS, per_device_ms, rng,
                           signing_key(cfg)) for device, rs in devices.items()]
    # devices interleaved, each in seq order, as the stream job emits them
    produce_all(cfg, [m for step in zip_longest(*per_device) for m in step if m is not None])
    n = sum(len(rs) for rs in devices.values())
    timing, sink = run_until_stored(cfg, n)
    with Store(cfg) as store:
        stored = min(store.count_readings("predictions"), store.count_readings("device_data"))
        docs = {key: store.find(key) for key in WRITTEN_KEYS}
    if stored != n:
        raise RuntimeError(f"stored {stored:,} of {n:,} readings")
    floor_s = floor(cfg, docs)
    return {"readings": n, **timing, "readings_per_s": n / timing["seconds"],
            "steady_readings_per_s": steady_rate(timing["flushes"], n, timing["seconds"]),
            "documents": {key: len(d) for key, d in docs.items()}, "floor_seconds": floor_s,
            "floor_readings_per_s": n / floor_s, "sink_stats": dict(sink.stats),
            "sink_seconds": {k: round(v, 2) for k, v in sink.seconds.items()}}


def floor(cfg, docs: dict[str, list[dict]]) -> float:
    """Seconds for raw pymongo insert_many of these documents into a fresh database."""
    import pymongo

    client = pymongo.MongoClient(cfg.mongo_uri)
    db = client[f"{cfg.mongo.database}_floor"]
    batch = cfg.mongo.write_batch_size
    started = time.monotonic()
    for key, key_docs in docs.items():
        collection = db[cfg.mongo.collections[key]]
        for i in range(0, len(key_docs), batch):
            collection.insert_many(key_docs[i:i + batch], ordered=False)
    seconds = time.monotonic() - started
    client.drop_database(db.name)
    client.close()
    return seconds


def paced_producer(cfg_env: dict, devices: list[str], metrics: list[dict], rate: float, seconds: float,
                   sent) -> None:
    """Child process: both topics at `rate` readings/s for `seconds`, live timestamps; `sent` counts readings."""
    cfg = load_config(env=cfg_env)
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": cfg.kafka_bootstrap, "linger.ms": 5, "compression.type": "lz4",
                         "queue.buffering.max.messages": 2_000_000, "log_level": 3})
    rng, key = np.random.default_rng(2), signing_key(cfg)
    per_device_ms = 1000.0 * len(devices) / rate
    interval = len(devices) * MESSAGE_READINGS / rate  # one message per device per interval
    started, step = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        seq0 = step * MESSAGE_READINGS
        for d, device in enumerate(devices):
            rows = [Reading(device, 0, 0, metrics[(seq0 + i) % len(metrics)]) for i in range(MESSAGE_READINGS)]
            for device_key, telemetry, scores in messages(device, rows, seq0, LIVE_START_MS, per_device_ms, rng, key):
                producer.produce(cfg.kafka.topics.telemetry, telemetry, key=device_key)
                producer.produce(cfg.kafka.topics.scores, scores, key=device_key)
        producer.poll(0)
        step += 1
        sent.value = step * MESSAGE_READINGS * len(devices)
        delay = started + step * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    producer.flush(60)


LAG_GIVE_UP_FACTOR, LAG_GIVE_UP_EXTRA_S = 3, 120  # the lag run fails after this × --seconds + this many seconds


def lag(env: dict, devices: dict[str, list[Reading]], rate: float, seconds: float) -> dict:
    """Readings produced but not stored when a `seconds`-long paced run at `rate` ends, and the catch-up time."""
    cfg = fresh(env, "lag")
    metrics = [dict(r.metrics) for r in next(iter(devices.values()))[:256]]
    # spawned, not forked: a child forked from this process after its threads started (pymongo's monitors, the sink's
    # store thread, Kafka's) inherits any lock one of them held at that moment, held for good: a forked producer hung
    # once in a futex for minutes, and the run with it
    context = multiprocessing.get_context("spawn")
    sent = context.Value("q", 0)
    producer = context.Process(target=paced_producer, args=(
        {**os.environ, **env, **topic_env(env, "lag")}, list(devices), metrics, rate, seconds, sent), daemon=True)
    sink = MongoSink(cfg)
    stored = lambda: min(sink.stats["predictions"], sink.stats["device_data"])  # noqa: E731
    marks: dict = {}

    def stop() -> bool:
        if "end" not in marks and not producer.is_alive() and marks.get("started"):
            marks["end"], marks["behind"], marks["sent"] = time.monotonic(), sent.value - stored(), sent.value
        return "end" in marks and stored() >= marks["sent"] or time.monotonic() - marks.get("t0", 1e18) > give_up_s

    give_up_s = LAG_GIVE_UP_FACTOR * seconds + LAG_GIVE_UP_EXTRA_S
    marks["t0"] = time.monotonic()
    producer.start()
    marks["started"] = True
    sink.run(should_stop=stop)
    producer.join(30)
    if "end" not in marks or stored() < marks["sent"]:
        producer.kill()
        what = ("the producer process had not finished" if "end" not in marks else
                f"{marks['sent'] - stored():,} of {marks['sent']:,} readings were still not stored")
        raise RuntimeError(f"lag run gave up after {give_up_s:.0f} s: {what}")
    return {"rate": rate, "seconds": seconds, "sent": marks["sent"], "achieved_rate": marks["sent"] / seconds,
            "behind_at_end": marks["behind"], "behind_seconds": marks["behind"] / rate,
            "catch_up_seconds": time.monotonic() - marks["end"], "stored": stored()}


def topic_env(env: dict, name: str) -> dict:
    base = load_config(env={**os.environ, **env})
    return {**{f"FLEAD_KAFKA_TOPICS_{k.upper()}": f"{v}.{name}" for k, v in base.kafka.topics.to_dict().items()},
            "FLEAD_MONGO_DATABASE": f"bench_sink_{name}"}


def fresh(env: dict, name: str):
    """A config with its own topics and database (created)."""
    cfg = load_config(env={**os.environ, **env, **topic_env(env, name)})
    stack.ensure_topics(cfg)
    with Store(cfg) as store:
        store.init()
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 copies of each device (instead of --copies), a 15 s lag run")
    parser.add_argument("--copies", type=int, default=12, help="each ASD device this many times (default 12)")
    parser.add_argument("--rate", type=float, default=35_000.0, help="lag run: readings/s produced")
    parser.add_argument("--seconds", type=float, default=None, help="lag run: seconds of producing (default 60)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    seconds = args.seconds or (15.0 if args.quick else 60.0)

    state_dir = Path(tempfile.mkdtemp(prefix="flead-bench-sink-"))
    env = {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_KAFKA_PORT": str(processes.free_port()),
           "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port()), "FLEAD_MONGO_PORT": str(processes.free_port())}
    cfg = load_config(env={**os.environ, **env})
    try:
        stack.up(cfg, say=lambda line: None)
        devices = asd_devices(cfg, 8 if args.quick else args.copies, 4320)
        live = throughput(env, devices, live_rate=args.rate)
        print(f"live: {live}", flush=True)
        replay = throughput(env, devices, live_rate=None)
        print(f"replay: {replay}", flush=True)
        behind = lag(env, devices, args.rate, seconds)
        print(f"lag: {behind}", flush=True)
    finally:
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)

    n_devices = len(devices)
    rows = [
        {"name": f"sink, live event times: {live['readings']:,} readings of {n_devices} devices (telemetry + score), "
                 f"steady state (after the first of its {len(live['flushes'])} flushes)",
         "value": rounded(live["steady_readings_per_s"]), "unit": "readings/s"},
        {"name": "  from its partition assignment (the first flush's gathering included)",
         "value": round(live["readings_per_s"]), "unit": "readings/s"},
        {"name": "  floor: the same documents, raw pymongo insert_many", "value": round(live["floor_readings_per_s"]),
         "unit": "readings/s"},
        {"name": "  sink start-up before that (consumer group join)", "value": round(live["startup_seconds"], 1),
         "unit": "s"},
        {"name": f"sink, ASD replay event times (5-minute spacing: more roll-up buckets), steady state "
                 f"({len(replay['flushes'])} flushes)",
         "value": rounded(replay["steady_readings_per_s"]), "unit": "readings/s"},
        {"name": "  from its partition assignment", "value": round(replay["readings_per_s"]), "unit": "readings/s"},
        {"name": "  floor: the same documents, raw pymongo insert_many",
         "value": round(replay["floor_readings_per_s"]), "unit": "readings/s"},
        {"name": f"lag run: produced at {args.rate:,.0f} readings/s for {seconds:.0f} s (achieved)",
         "value": round(behind["achieved_rate"]), "unit": "readings/s"},
        {"name": "  readings not yet stored when the producer stopped", "value": behind["behind_at_end"],
         "unit": "readings"},
        {"name": "  ... that is, behind by", "value": round(behind["behind_seconds"], 1), "unit": "s"},
        {"name": "  time to catch up after the producer stopped", "value": round(behind["catch_up_seconds"], 1),
         "unit": "s"},
    ]
    rows = [row for row in rows if row["value"] is not None]  # a steady state needs 3 flushes (`steady_rate`)
    print(f"{'measure':<110} {'value':>10}  unit")
    for row in rows:
        print(f"{row['name']:<110} {row['value']:>10,}  {row['unit']}")
    write_json(args.json, {
        "headline": {"name": "sink readings/s stored (telemetry + score), live event times, steady state",
                     "unit": "readings/s",
                     "value": rounded(live["steady_readings_per_s"]) or round(live["readings_per_s"]),
                     "floor": round(live["floor_readings_per_s"])},
        "rows": rows, "live": live, "replay": replay, "lag": behind,
        "settings": {"sink": cfg.sink.to_dict(), "rollups": cfg.rollups.to_dict(), "devices": n_devices,
                     "message_readings": MESSAGE_READINGS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
