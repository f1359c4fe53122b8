"""Supervision and file modes as a user meets them: `flead up` on its own state dir and ports, servers and a
service killed with SIGKILL come back by themselves, the supervisor comes back with the next command, and
everything under the state dir is private."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from config import PROJECT_ROOT
from services import processes
from services.service import read_spec, readable_by_others

pytestmark = pytest.mark.integration

RESTART_WITHIN_S = 90.0


def flead(env: dict, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestration.cli", *args], env=env, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stack_env(tmp_path):
    """An own stack: state dir and ports of this test only; `flead down` afterwards."""
    state = tmp_path / "state"
    env = {**os.environ, "FLEAD_STATE_DIR": str(state)}
    for key in ("KAFKA_PORT", "KAFKA_CONTROLLER_PORT", "MONGO_PORT"):
        env[f"FLEAD_{key}"] = str(processes.free_port())
    for key in ("FLEAD_KAFKA_BOOTSTRAP", "FLEAD_MONGO_URI", "FLEAD_MONGO_DATABASE"):
        env.pop(key, None)
    yield env, state
    flead(env, "down")


def wait_restarted(state: Path, name: str, old_pid: int, restarts: int) -> int:
    deadline = time.monotonic() + RESTART_WITHIN_S
    while time.monotonic() < deadline:
        pid = processes.running_pid(state, name)
        if pid not in (None, old_pid) and (read_spec(state, name) or {}).get("restarts") == restarts:
            return pid
        time.sleep(0.5)
    raise AssertionError(f"{name} not restarted within {RESTART_WITHIN_S:.0f} s:\n"
                         f"{processes.log_tail(state, 'supervisor', 20)}")


def test_killed_servers_and_services_come_back_and_the_state_dir_stays_private(stack_env):
    env, state = stack_env
    up = flead(env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "supervisor pid" in up.stdout
    assert readable_by_others(state) == []  # server data, logs, registrations: 0600 files, 0700 folders

    # modes that went wrong (an older version, a user's cp) are put right by the next `flead up`
    sqlite = next((state / "mongo").rglob("*.sqlite"))
    sqlite.chmod(0o644)
    state.chmod(0o755)
    again = flead(env, "up")
    assert again.returncode == 0 and "made private" in again.stdout, again.stdout + again.stderr
    assert readable_by_others(state) == []

    sink = flead(env, "sink", "start")
    assert sink.returncode == 0 and "sink started" in sink.stdout, sink.stdout + sink.stderr
    for name, restarts in (("kafka", 1), ("mongo", 1), ("sink", 1)):
        pid = processes.running_pid(state, name)
        os.kill(pid, signal.SIGKILL)
        wait_restarted(state, name, pid, restarts)
    deadline = time.monotonic() + RESTART_WITHIN_S
    while (status := flead(env, "status")).returncode != 0 and time.monotonic() < deadline:
        time.sleep(1)  # a broker killed mid-write recovers its log first
    assert status.returncode == 0, status.stdout + status.stderr  # the servers answer again
    lines = {line.split()[0]: line for line in status.stdout.splitlines()}
    assert "restarts=1" in lines["kafka"] and "restarts=1" in lines["mongo"] and "restarts=1" in lines["sink"]
    log = (state / "logs" / "supervisor.log").read_text()
    assert "restarted kafka" in log and "restarted mongo" in log and "restarted sink" in log

    # the supervisor itself: back with the next flead command
    supervisor = processes.running_pid(state, "supervisor")
    os.kill(supervisor, signal.SIGKILL)
    time.sleep(0.5)
    assert flead(env, "status").returncode == 0
    assert processes.running_pid(state, "supervisor") not in (None, supervisor)

    # a deliberate stop is not undone
    assert "sink stopped" in flead(env, "sink", "stop").stdout
    time.sleep(3)
    assert processes.running_pid(state, "sink") is None

    doctor = flead(env, "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "listens on 127.0.0.1 only" in doctor.stdout

    pids = {name: processes.recorded_pid(state, name) for name in ("kafka", "mongo", "supervisor")}
    down = flead(env, "down")
    assert down.returncode == 0 and "stopped kafka" in down.stdout, down.stdout + down.stderr
    for name, (pid, started) in pids.items():
        assert processes.session_members(pid, started) == [], f"{name}: something of its session still runs"
