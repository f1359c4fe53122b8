"""Background processes by name: pid files and logs in the state directory, start, stop, ports.

A process is known by a name (``kafka``, ``mongo``, ``stream``, ...). Its pid file (``<state_dir>/run/<name>.pid``)
holds the pid and the process's start time, so a recycled pid is never mistaken for ours, and ``stop`` only ever
signals what we started. Output goes to ``<state_dir>/logs/<name>.log``. Every process starts in a session of its
own (so ``stop`` reaches its children) with the umask `PRIVATE_UMASK`: what it writes is readable by its user only.

This module is the bottom of the process layer (stdlib only); `services.service.Service` builds on it.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

PRIVATE_UMASK = 0o077  # files 0600, folders 0700: logs, databases, checkpoints and credentials stay private
PARENT_CHECK_S = 1.0  # how often a helper process started by `exit_with_parent` looks for its parent


class ServiceError(RuntimeError):
    """A server could not be started, reached or stopped; the message says what to do."""


def run_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "run"


def log_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "logs" / f"{name}.log"


def pid_file(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir) / f"{name}.pid"


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str) -> bool:
    """True when `pid` is the process that started at `started` and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return state[19] == started and state[0] != "Z"


def recorded_pid(state_dir: Path, name: str) -> tuple[int, str] | None:
    """(pid, start time) from the pid file of `name`, whether or not that process still runs."""
    try:
        pid_text, started = pid_file(state_dir, name).read_text().split()
        return int(pid_text), started
    except (OSError, ValueError):
        return None


def running_pid(state_dir: Path, name: str) -> int | None:
    """The pid of our process `name` if it is alive, else None. (A stale pid file stays: it tells `stop` and the
    supervisor which session's leftovers to kill; the start time in it keeps a recycled pid from passing.)"""
    recorded = recorded_pid(state_dir, name)
    return recorded[0] if recorded is not None and _alive(*recorded) else None


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and private instances)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ensure_port_free(host: str, port: int, setting: str) -> None:
    if port_open(host, port):
        raise ServiceError(f"{host}:{port} is already taken by a process flead did not start; "
                           f"stop it or choose another port with {setting}")


def log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    try:
        return "\n".join(log_path(state_dir, name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) readable by this user only; returns it."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def start(state_dir: Path, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None,
          cwd: Path | None = None, note: str = "") -> int:
    """Start `cmd` detached (own session, private umask), output appended to logs/<name>.log; returns its pid.

    `env` is added to this process's environment. `note` is appended to the log's start line (e.g. why).
    """
    log = log_path(state_dir, name)
    private_dir(log.parent)
    private_dir(run_dir(state_dir))
    opener = lambda path, flags: os.open(path, flags, 0o600)  # noqa: E731 - a new log is private too
    with open(log, "ab", opener=opener) as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting{note}: {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                                umask=PRIVATE_UMASK)
    started = None
    for _ in range(50):  # /proc entry appears at once; retry briefly for safety
        started = start_time(proc.pid)
        if started:
            break
        time.sleep(0.01)
    pid_file(state_dir, name).write_text(f"{proc.pid} {started}\n")
    return proc.pid


def wait_until(check: Callable[[], bool], what: str, timeout: float, state_dir: Path, name: str) -> None:
    """Poll `check` until it is true; fail early with the log's tail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(state_dir, name) is None:
            raise ServiceError(f"{name} exited while starting ({what}); last lines of "
                               f"{log_path(state_dir, name)}:\n{log_tail(state_dir, name)}")
        time.sleep(0.25)
    raise ServiceError(f"{name}: {what} not reached after {timeout:.0f} s; see {log_path(state_dir, name)}:\n"
                       f"{log_tail(state_dir, name)}")


def stop(state_dir: Path, name: str, grace: float = 20.0, leader_grace: float = 0.0) -> bool:
    """Stop our process `name` (SIGTERM to its process group, then SIGKILL); True if one was running.

    With `leader_grace` the process itself gets SIGTERM alone first and that long to end on its own (its children
    still running: e.g. the stream job stops its JVM's job with a savepoint). The rest of its session (children it
    left behind) gets the same signals, also when the process itself was already gone."""
    recorded = recorded_pid(state_dir, name)
    pid = running_pid(state_dir, name)
    if pid is None:
        if recorded is not None:
            kill_session_leftovers(*recorded)
            pid_file(state_dir, name).unlink(missing_ok=True)
        return False
    steps = [(os.kill, signal.SIGTERM, leader_grace)] if leader_grace > 0 else []
    for send, sig, wait in steps + [(os.killpg, signal.SIGTERM, grace), (os.killpg, signal.SIGKILL, 5.0)]:
        try:
            send(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and running_pid(state_dir, name) is not None:
            time.sleep(0.1)
        if running_pid(state_dir, name) is None:
            break
    reap(pid)
    kill_session_leftovers(pid, recorded[1] if recorded else "0")
    pid_file(state_dir, name).unlink(missing_ok=True)
    return True


def session_members(session: int, not_before: str) -> list[int]:
    """Live processes of session `session` (our process started it with that pid) that started at or after
    `not_before` (clock ticks since boot): what is left of a process we started once its leader is gone."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields: state ppid pgrp session ... starttime (index 19)
        if int(fields[3]) == session and fields[0] != "Z" and int(fields[19]) >= int(not_before):
            members.append(int(entry.name))
    return members


def kill_session_leftovers(session: int, not_before: str) -> list[int]:
    """SIGKILL what remains of the session our process `session` led (e.g. the JVM of a killed job)."""
    killed = []
    for pid in session_members(session, not_before):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


def reap(pid: int) -> None:
    """Collect the exit status if the process is our child (avoids zombies in long-lived callers)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def exit_with_parent(check_every_s: float = PARENT_CHECK_S) -> None:
    """Make this (helper) process exit once the process that started it is gone, even by kill -9: a thread checks
    every `check_every_s` whether it was re-parented. For worker pools' initializers (the sink's decode process),
    so a killed service restarted by the supervisor never leaves its helpers running."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(check_every_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
