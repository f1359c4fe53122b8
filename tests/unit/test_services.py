"""services/: pid files, Service start/stop/registration, the supervisor's restarts and back-off, private modes,
listening sockets — on small real processes (sleep, a Python socket), no servers."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import listeners, processes
from services.service import (Service, ensure_private_modes, read_spec, readable_by_others, registered,
                              stop_by_name)
from services.supervisor import Backoff, Supervisor

SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]


def listen_on(host: str) -> list[str]:
    """A process that listens on host:<free port> until killed."""
    return [sys.executable, "-c", f"import socket, time; s = socket.socket(); s.bind(({host!r}, 0)); s.listen(); "
                                  "time.sleep(300)"]


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def state(tmp_path):
    yield tmp_path
    for name in list(p.stem for p in (tmp_path / "run").glob("*.pid")):
        stop_by_name(tmp_path, name, grace=1.0)


def test_start_registers_stop_deregisters_and_kills_the_session(state):
    svc = Service(state, "sleeper", SLEEP, env={"FLEAD_TEST_MARK": "1"}, stop_grace=1.0)
    started = svc.start()
    assert started.new and svc.pid == started.pid and str(started).startswith("sleeper started (pid")
    again = svc.start()
    assert not again.new and again.pid == started.pid and "already running" in str(again)
    spec = read_spec(state, "sleeper")
    assert spec["argv"] == SLEEP and spec["env"]["FLEAD_TEST_MARK"] == "1" and spec["restarts"] == 0
    assert stat.S_IMODE(os.stat(state / "run" / "sleeper.json").st_mode) == 0o600
    assert svc.stop() is True
    assert svc.pid is None and read_spec(state, "sleeper") is None and registered(state) == []
    assert svc.stop() is False


# A leader that, on SIGTERM, checks its child is still alive (writes "child alive" to the file argv[1]), then ends it
# and exits: what the stream job does (its JVM stops the job with a savepoint before the process ends).
GRACEFUL_LEADER = [sys.executable, "-c", """
import signal, subprocess, sys, time
def stop(*_):
    alive = child.poll() is None
    open(sys.argv[1], "w").write("child alive" if alive else "child gone")
    time.sleep(0.3)
    child.terminate()
    child.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
time.sleep(300)
"""]


def test_a_leader_grace_signals_the_process_alone_first_and_the_group_only_if_it_does_not_end(state):
    outcome = state / "outcome"
    graceful = Service(state, "graceful", GRACEFUL_LEADER + [str(outcome)], stop_grace=1.0, leader_grace=10.0)
    graceful.start()
    wait_for(lambda: len(processes.session_members(graceful.pid, "0")) == 2)
    started = time.monotonic()
    assert graceful.stop() is True
    assert outcome.read_text() == "child alive" and time.monotonic() - started < 5
    assert read_spec(state, "graceful") is None
    # registered with it: `flead down` (stop_by_name) gives the same grace; a process that ignores the signal is
    # stopped after it
    ready = state / "ignoring"
    stubborn = Service(state, "stubborn", [sys.executable, "-c", "import signal, sys, time; "
                                           "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                           "open(sys.argv[1], 'w').close(); time.sleep(300)", str(ready)],
                       stop_grace=0.5, leader_grace=1.0)
    stubborn.start()
    wait_for(ready.exists)
    assert read_spec(state, "stubborn")["leader_grace"] == 1.0
    started = time.monotonic()
    assert stop_by_name(state, "stubborn") is True
    assert stubborn.pid is None and 1.0 <= time.monotonic() - started < 8


def test_a_service_that_never_gets_ready_is_stopped_and_deregistered_with_its_log(state):
    svc = Service(state, "broken", [sys.executable, "-c", "print('cannot bind'); raise SystemExit(3)"],
                  ready=lambda: False, ready_what="port open", ready_timeout=5)
    with pytest.raises(processes.ServiceError, match=r"broken exited while starting \(port open\)[\s\S]*cannot bind"):
        svc.start()
    assert read_spec(state, "broken") is None


def test_started_processes_write_private_files(state):
    svc = Service(state, "writer", [sys.executable, "-c", "open('out.txt', 'w').write('x'); import os; "
                                    "os.mkdir('sub'); import time; time.sleep(300)"], cwd=state)
    svc.start()
    wait_for(lambda: (state / "sub").exists())
    assert stat.S_IMODE(os.stat(state / "out.txt").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "sub").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(svc.log_path).st_mode) == 0o600


def test_the_supervisor_restarts_a_killed_service_counts_it_and_kills_leftovers(state):
    # a leader that forks a child into its session, as a job's Python process starts its JVM
    argv = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(300)']); time.sleep(300)"]
    svc = Service(state, "job", argv)
    first = svc.start().pid
    wait_for(lambda: len(processes.session_members(first, processes.start_time(first))) == 2)
    child = [p for p in processes.session_members(first, processes.start_time(first)) if p != first][0]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: svc.pid is None)
    supervisor = Supervisor(state, initial_s=1.0, max_s=4.0, stable_after_s=30.0)
    assert supervisor.check() == ["job"]
    assert svc.pid not in (None, first)
    wait_for(lambda: not os.path.exists(f"/proc/{child}") or "Z" in open(f"/proc/{child}/stat").read().split()[2])
    assert read_spec(state, "job")["restarts"] == 1 and svc.status()["restarts"] == 1
    assert "restart #1 by the supervisor" in svc.log_path.read_text()
    supervisor.reap_children()


def test_a_service_that_keeps_dying_is_restarted_with_back_off(state):
    svc = Service(state, "crasher", [sys.executable, "-c", "import time; time.sleep(0.2)"])
    svc.start()
    supervisor = Supervisor(state, initial_s=10.0, max_s=40.0, stable_after_s=60.0)
    wait_for(lambda: svc.pid is None)
    now = time.monotonic()
    assert supervisor.check(now) == ["crasher"]             # first death: at once
    wait_for(lambda: svc.pid is None)
    assert supervisor.check(now + 1) == []                   # died 1 s after its restart: waits 10 s
    assert supervisor.check(now + 5) == []
    assert supervisor.check(now + 11.5) == ["crasher"]
    wait_for(lambda: svc.pid is None)
    assert supervisor.check(now + 12) == []                  # again: 20 s
    assert supervisor.check(now + 12, immediately=True) == ["crasher"]  # `flead up` / `flead doctor` do not wait
    assert read_spec(state, "crasher")["restarts"] == 3
    supervisor.reap_children()


def test_a_stopped_service_is_never_restarted(state):
    svc = Service(state, "stopped", SLEEP, stop_grace=1.0)
    svc.start()
    svc.stop()
    assert Supervisor(state, 1.0, 4.0, 30.0).check(immediately=True) == []
    assert svc.pid is None


def test_backoff_doubles_up_to_its_maximum_and_resets_after_a_stable_run():
    b = Backoff(initial_s=2.0, max_s=10.0, stable_after_s=60.0)
    delays = []
    for t in range(5):
        b.died(float(t))
        delays.append(b.delay())
        b.started(float(t))
    assert delays == [0.0, 2.0, 4.0, 8.0, 10.0]
    b.died(200.0)  # ran 196 s: stable, restarted at once
    assert b.delay() == 0.0


def test_private_modes_are_restored_without_following_symlinks(tmp_path):
    outside = tmp_path / "outside.jar"
    outside.write_text("x")
    outside.chmod(0o644)
    state = tmp_path / "state"
    (state / "mongo" / "data").mkdir(parents=True)
    for folder in (state, state / "mongo" / "data"):
        folder.chmod(0o700)
    db = state / "mongo" / "data" / "flead.sqlite"
    db.write_text("x")
    db.chmod(0o644)
    (state / "mongo").chmod(0o755)
    script = state / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (state / "link.jar").symlink_to(outside)
    assert sorted(readable_by_others(state)) == sorted([f"0o755 {state / 'mongo'}", f"0o644 {db}", f"0o755 {script}"])
    changed = ensure_private_modes(state)
    assert set(changed) == {db, state / "mongo", script}
    assert stat.S_IMODE(db.stat().st_mode) == 0o600 and stat.S_IMODE((state / "mongo").stat().st_mode) == 0o700
    assert stat.S_IMODE(script.stat().st_mode) == 0o700
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a symlink's target outside is left alone
    assert ensure_private_modes(state) == [] and readable_by_others(state) == []


def test_what_vanishes_during_the_walk_is_skipped(tmp_path, monkeypatch):
    """A running job retires checkpoints while the state dir is walked: that is no error."""
    tmp_path.chmod(0o700)
    (tmp_path / "chk-3").mkdir(mode=0o755)
    real_lstat = Path.lstat
    monkeypatch.setattr(Path, "lstat", lambda p: (_ for _ in ()).throw(FileNotFoundError(p)) if p.name == "chk-3"
                        else real_lstat(p))
    assert readable_by_others(tmp_path) == [] and ensure_private_modes(tmp_path) == []


def test_listeners_name_the_service_and_tell_loopback_from_every_interface(state):
    Service(state, "private", listen_on("127.0.0.1")).start()
    Service(state, "public", listen_on("0.0.0.0")).start()
    wait_for(lambda: len(listeners.listeners(listeners.state_dir_processes(state))) == 2)
    exposed = listeners.exposed(state)
    assert [(item.service, item.address) for item in exposed] == [("public", "0.0.0.0")]
    assert "public (pid" in str(exposed[0]) and "listens on 0.0.0.0:" in str(exposed[0])


def test_addresses_of_proc_net_tcp_are_decoded():
    assert listeners._decode_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert listeners._decode_address("00000000:0050") == ("0.0.0.0", 80)
    assert listeners._decode_address("00000000000000000000000001000000:0016") == ("::1", 22)


def test_registrations_are_listed_servers_first(state):
    from services.service import SERVER_PRIORITY

    Service(state, "a-client", SLEEP).start()
    Service(state, "z-server", SLEEP, priority=SERVER_PRIORITY).start()
    assert [spec["name"] for spec in registered(state)] == ["z-server", "a-client"]
    assert json.loads((state / "run" / "a-client.json").read_text())["name"] == "a-client"


def test_processes_mentioning_a_path_include_their_children(tmp_path):
    marker = str(tmp_path / "conf")
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               "'-c', 'import time; time.sleep(300)']); time.sleep(300)", marker])
    try:
        wait_for(lambda: len(listeners.processes_mentioning(marker, "daemon")) == 2)
        found = listeners.processes_mentioning(marker, "daemon")
        assert parent.pid in found and set(found.values()) == {"daemon"}
    finally:
        for pid in listeners.processes_mentioning(marker, "daemon"):
            os.kill(pid, signal.SIGKILL)
        parent.wait()


def test_a_helper_started_with_exit_with_parent_exits_when_its_parent_is_killed(tmp_path):
    """The sink's decode process outlived a kill -9 of the sink (an orphan per restart); now it follows its parent."""
    pid_out = tmp_path / "helper.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "from services import processes; import time; "
                           "processes.exit_with_parent(0.1); time.sleep(60)"])
open({str(pid_out)!r}, "w").write(str(helper.pid))
time.sleep(60)
"""], cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 20
        while not (pid_out.exists() and pid_out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        helper = int(pid_out.read_text())
        time.sleep(1.0)  # the helper imports and starts its watch
        assert processes.start_time(helper) is not None
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    deadline = time.monotonic() + 10
    while processes.start_time(helper) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes.start_time(helper) is None, "the helper outlived its killed parent"
