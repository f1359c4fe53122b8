"""bench/produce.py: its report is JSON (the producer's configuration holds a logger object); every benchmark
stops cleanly on SIGTERM and says what state the machine was in (bench/bench_output.py)."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from config import load_config
from telemetry.producer import producer_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from produce import reported_config  # noqa: E402


def test_the_reported_configuration_is_json_without_the_broker_address():
    config = producer_config(load_config())
    assert any(not isinstance(v, (str, int, float, bool)) for v in config.values())  # the logger
    shown = reported_config(config)
    json.dumps(shown)
    assert "bootstrap.servers" not in shown and "logger" not in shown
    assert shown["linger.ms"] == config["linger.ms"]


def test_a_benchmark_stopped_by_sigterm_runs_its_cleanup():
    """`kill` or `timeout` ends a benchmark through its `finally` blocks (which stop the servers it started)."""
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from bench_output import stop_cleanly_on_sigterm\n"
              "stop_cleanly_on_sigterm()\n"
              "try:\n    print('up', flush=True)\n    time.sleep(60)\nfinally:\n    print('servers stopped', flush=True)\n")
    bench = Path(__file__).resolve().parents[2] / "bench"
    with subprocess.Popen([sys.executable, "-c", script, str(bench)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline() == "up\n"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert out == "servers stopped\n" and proc.returncode == 128 + signal.SIGTERM


def test_every_result_says_what_state_the_machine_was_in(tmp_path):
    """`write_json` adds the machine's cores, load and how fast it gives fresh memory, keeping a benchmark's own
    ``machine`` entries; a result without a full headline is refused."""
    from bench_output import write_json

    out = tmp_path / "sub" / "result.json"
    write_json(out, {"headline": {"name": "n", "value": 1, "unit": "u", "floor": 2}, "machine": {"cpus": "own"}})
    machine = json.loads(out.read_text())["machine"]
    assert machine["cpus"] == "own" and len(machine["load_average"]) == 3
    assert machine["memory_first_touch_gb_per_s"] > 0
    with pytest.raises(ValueError, match="headline"):
        write_json(out, {"headline": {"name": "n"}})
