"""Small SYNTHETIC samples in the Intel Berkeley Lab and network-load export formats, with injected anomalies.

The public files of those two formats are not reachable from here, so these samples exist to test the readers
and demo the pipeline; they are not measurements. ``python -m telemetry.synthetic`` rewrites
``telemetry/samples/`` (the committed copies); the output is deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
INTEL_LAB_FILE = "synthetic_intel_lab.txt"
NETLOAD_FILE = "synthetic_netload.csv"
ANOMALIES_FILE = "synthetic_anomalies.json"

INTEL_START = datetime(2004, 3, 1, 0, 0, 0, tzinfo=timezone.utc)
INTEL_MOTES = [1, 2, 3, 4]
INTEL_READINGS_PER_MOTE = 450
INTEL_INTERVAL_S = 120
# A dying battery: voltage sags and the temperature sensor drifts up to the 122.153 the real motes report.
INTEL_BATTERY_FAILURE = {"mote": 2, "from_index": 380}
INTEL_HUMIDITY_SPIKE = {"mote": 4, "from_index": 200, "to_index": 210}

NETLOAD_START = datetime(2024, 3, 1, 0, 0, 0, tzinfo=timezone.utc)
NETLOAD_INTERFACES = [("core-rtr-1", "xe-0/0/0"), ("core-rtr-1", "xe-0/0/1"), ("edge-sw-2", "ge-1/0/1"),
                      ("edge-sw-2", "ge-1/0/2"), ("edge-sw-3", "ge-1/0/1"), ("edge-sw-3", "ge-1/0/2")]
NETLOAD_HOURS = 14 * 24
NETLOAD_SATURATION = {"device": "core-rtr-1/xe-0/0/1", "from_hour": 250, "to_hour": 255}
NETLOAD_OUTAGE = {"device": "edge-sw-3/ge-1/0/2", "from_hour": 300, "to_hour": 303}


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def intel_lab_lines(rng: random.Random) -> tuple[list[str], list[dict]]:
    """Log lines ordered by time (motes interleaved) and the injected anomalies."""
    lines = []
    for i in range(INTEL_READINGS_PER_MOTE):
        for mote in INTEL_MOTES:
            at = INTEL_START + timedelta(seconds=i * INTEL_INTERVAL_S + mote * 7, microseconds=rng.randrange(10**6))
            day = math.sin(2 * math.pi * (at.hour * 3600 + at.minute * 60) / 86400 - math.pi / 2)
            temperature = 21 + 3 * day + mote * 0.3 + rng.gauss(0, 0.15)
            humidity = 38 - 4 * day + rng.gauss(0, 0.4)
            light = max(0.0, 300 * day + rng.gauss(0, 10)) + 5
            voltage = 2.70 - 0.0001 * i + rng.gauss(0, 0.002)
            failure = INTEL_BATTERY_FAILURE
            if mote == failure["mote"] and i >= failure["from_index"]:
                progress = min(1.0, (i - failure["from_index"]) / 40)
                voltage = 2.70 - 0.45 * progress + rng.gauss(0, 0.002)
                temperature = temperature + (122.153 - temperature) * progress
            spike = INTEL_HUMIDITY_SPIKE
            if mote == spike["mote"] and spike["from_index"] <= i < spike["to_index"]:
                humidity = 95 + rng.gauss(0, 1)
            lines.append(f"{at:%Y-%m-%d} {at:%H:%M:%S.%f} {i} {mote} {temperature:.4f} {humidity:.4f} "
                         f"{light:.2f} {voltage:.5f}")

    def span(start: int, stop: int) -> list[str]:
        return [_iso(INTEL_START + timedelta(seconds=k * INTEL_INTERVAL_S)) for k in (start, stop)]

    anomalies = [
        {"file": INTEL_LAB_FILE, "device_id": f"mote-{INTEL_BATTERY_FAILURE['mote']}", "kind": "battery failure",
         "window": span(INTEL_BATTERY_FAILURE["from_index"], INTEL_READINGS_PER_MOTE - 1)},
        {"file": INTEL_LAB_FILE, "device_id": f"mote-{INTEL_HUMIDITY_SPIKE['mote']}", "kind": "humidity spike",
         "window": span(INTEL_HUMIDITY_SPIKE["from_index"], INTEL_HUMIDITY_SPIKE["to_index"])},
    ]
    return lines, anomalies


def netload_rows(rng: random.Random) -> tuple[list[str], list[dict]]:
    """CSV lines (header first) ordered by hour then interface, and the injected anomalies."""
    lines = ["timeslot,hostname,ifname,max_metric_value,mean_metric_value"]
    for hour in range(NETLOAD_HOURS):
        at = NETLOAD_START + timedelta(hours=hour)
        daily = 0.5 + 0.5 * math.sin(2 * math.pi * (at.hour - 8) / 24)
        weekly = 0.7 if at.weekday() >= 5 else 1.0
        for k, (host, iface) in enumerate(NETLOAD_INTERFACES):
            mean = (10 + 5 * k) + 40 * daily * weekly + rng.gauss(0, 2)
            peak = mean * (1.2 + 0.2 * rng.random())
            device = f"{host}/{iface}"
            if device == NETLOAD_SATURATION["device"] and NETLOAD_SATURATION["from_hour"] <= hour < NETLOAD_SATURATION["to_hour"]:
                mean, peak = 93 + rng.gauss(0, 1), 100.0
            if device == NETLOAD_OUTAGE["device"] and NETLOAD_OUTAGE["from_hour"] <= hour < NETLOAD_OUTAGE["to_hour"]:
                mean, peak = 0.0, 0.0
            lines.append(f"{at:%Y-%m-%d %H:%M:%S},{host},{iface},{min(peak, 100.0):.2f},{max(mean, 0.0):.2f}")

    def span(spec: dict) -> list[str]:
        return [_iso(NETLOAD_START + timedelta(hours=h)) for h in (spec["from_hour"], spec["to_hour"] - 1)]

    anomalies = [
        {"file": NETLOAD_FILE, "device_id": NETLOAD_SATURATION["device"], "kind": "link saturation",
         "window": span(NETLOAD_SATURATION)},
        {"file": NETLOAD_FILE, "device_id": NETLOAD_OUTAGE["device"], "kind": "outage (zero traffic)",
         "window": span(NETLOAD_OUTAGE)},
    ]
    return lines, anomalies


def write_samples(out_dir: Path = SAMPLES_DIR, seed: int = 7) -> list[Path]:
    """Write both samples and the list of injected anomalies (windows inclusive, UTC); returns the files."""
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    intel, intel_anomalies = intel_lab_lines(rng)
    netload, netload_anomalies = netload_rows(rng)
    files = {INTEL_LAB_FILE: "\n".join(intel) + "\n", NETLOAD_FILE: "\n".join(netload) + "\n",
             ANOMALIES_FILE: json.dumps({"synthetic": True, "seed": seed,
                                         "anomalies": intel_anomalies + netload_anomalies}, indent=2) + "\n"}
    for name, text in files.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return [out_dir / name for name in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR, help="output folder (default: telemetry/samples)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    for path in write_samples(args.out, args.seed):
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
