"""What every benchmark writes: JSON with a `headline` {"name", "value", "unit", "floor"} and every row; how it
stops; and how the label-free benchmarks read a fleet's training data."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FIRST_TOUCH_PROBE_BYTES = 256 * 2**20  # what `first_touch_gb_per_s` allocates: ~0.05 s on a healthy machine


@contextmanager
def own_servers(name: str):
    """`own_servers_env` applied to this process, with its MongoDB and Kafka started; yields their `Config` and
    stops them (and removes the state dir) on the way out, however the benchmark ends."""
    from config import load_config
    from orchestration import stack

    state_dir, env = own_servers_env(name)
    os.environ.update(env)
    cfg = load_config()
    try:
        stack.start_mongo(cfg)
        stack.start_kafka(cfg)
        yield cfg
    finally:
        stack.down(cfg, say=lambda line: None)
        shutil.rmtree(state_dir, ignore_errors=True)


def own_servers_env(name: str) -> tuple[Path, dict[str, str]]:
    """A new temporary state dir and the settings that give a benchmark its own embedded MongoDB and Kafka there,
    on free ports (never the user's servers), for Spark bound to 127.0.0.1."""
    from services import processes

    state_dir = Path(tempfile.mkdtemp(prefix=f"flead-bench-{name}-"))
    return state_dir, {"FLEAD_STATE_DIR": str(state_dir), "FLEAD_MONGO_PORT": str(processes.free_port()),
                       "FLEAD_KAFKA_PORT": str(processes.free_port()),
                       "FLEAD_KAFKA_CONTROLLER_PORT": str(processes.free_port()), "FLEAD_KAFKA_BOOTSTRAP": "",
                       "FLEAD_MONGO_URI": "", "SPARK_LOCAL_IP": "127.0.0.1"}


def stop_cleanly_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `timeout`) end the benchmark as Ctrl-C does: through its ``finally`` blocks, which stop
    the broker, database and jobs it started (by default Python dies at once and leaves them running)."""
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def first_touch_gb_per_s(nbytes: int = FIRST_TOUCH_PROBE_BYTES) -> float:
    """GB/s at which this process is given memory it has not touched before (`nbytes` allocated and written once).

    On the virtual machines this project is measured on, memory the host has taken back costs 2.5–9 s per GB the
    first time it is touched against ~0.1 s otherwise (docs/benchmarks.md, "This virtual machine's memory"), and
    every run that starts processes or allocates large arrays pays it: a figure is only comparable with another
    measured in the same state of the machine. Indicative: memory another process freed a moment ago is handed
    out fast again, so a probe right after a large process ended can look healthy on a slow machine."""
    started = time.perf_counter()
    probe = np.ones(nbytes // 8)
    seconds = time.perf_counter() - started
    del probe
    return nbytes / 1e9 / max(seconds, 1e-9)


def machine_state() -> dict:
    """What the machine was like when a result was written: cores, Python, load average, `first_touch_gb_per_s`."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "memory_first_touch_gb_per_s": round(first_touch_gb_per_s(), 3)}


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` to `path` (folders made as needed), with `machine_state` under ``machine`` (beside what the
    benchmark put there itself); nothing when no path was asked for."""
    if path is None:
        return
    if not {"name", "value", "unit", "floor"} <= set(result.get("headline", {})):
        raise ValueError("a benchmark result needs a headline with name, value, unit and floor")
    result = {**result, "machine": {**machine_state(), **result.get("machine", {})}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def training_fleet_parser(doc: str, quick: tuple[int, int]) -> argparse.ArgumentParser:
    """The arguments of a label-free benchmark over a fleet's training CSV (`training_fleet`): ``--train``,
    ``--quick`` (`quick`: devices, readings of each) and ``--json``; its description is `doc`'s first paragraph."""
    parser = argparse.ArgumentParser(description=" ".join(doc.split("\n\n")[0].split()))
    parser.add_argument("--train", metavar="CSV", help="a multi-entity training CSV (default: ASD's, under "
                                                       "paths.data_dir)")
    parser.add_argument("--quick", action="store_true", help=f"{quick[0]} devices, their first {quick[1]:,} readings")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    return parser


def training_fleet(train: str | None, min_readings: int, tool: str, quick: tuple[int, int] | None = None
                   ) -> tuple[dict[str, np.ndarray], list[str], Path, dict[str, np.ndarray]]:
    """Every device's readings (device → (n, metrics)), the metric names, the path of a multi-entity training CSV
    (`train`, default ASD's under ``paths.data_dir``) and every device's event times (epoch ms, row for row),
    leaving out (and saying so) devices with fewer than `min_readings`; with `quick` (devices, readings), only the
    first devices and their first readings. Exits with status 2 after one clear line on stderr when the file cannot
    be read or no device is long enough (a script's wiring)."""
    from config import load_config
    from telemetry.datasets import device_arrays
    from telemetry.readers import MultiEntityCsvReader, ReaderError

    path = Path(train) if train else Path(load_config().paths.data_dir) / "asd" / "train.csv.gz"
    try:
        reader = MultiEntityCsvReader(path)
        stamps: dict = {}
        fleet = {device: X for device, (X, _) in device_arrays(reader, times=stamps).items()}
    except (OSError, ReaderError) as exc:
        print(f"{tool}: cannot read the training data: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    short = [device for device, X in fleet.items() if len(X) < min_readings]
    if short:
        print(f"left out {len(short)} device(s) with fewer than {min_readings} readings: {', '.join(short[:5])}")
    fleet = {device: X for device, X in fleet.items() if len(X) >= min_readings}
    if not fleet:
        print(f"{tool}: no device of {path} has {min_readings} readings or more", file=sys.stderr)
        raise SystemExit(2)
    if quick:
        fleet = {device: X[:quick[1]] for device, X in list(fleet.items())[:quick[0]]}
    return fleet, reader.metric_names, path, {device: stamps[device][:len(X)] for device, X in fleet.items()}
