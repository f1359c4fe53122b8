"""Background processes that `flead` starts and stops: pid files and logs in the state directory.

A process is known by a name (``kafka``, ``mongo``, ``stream``, ...). Its pid file holds the pid and the
process's start time, so a recycled pid is never mistaken for ours, and ``stop`` only ever signals what we started.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence


class StackError(RuntimeError):
    """A server could not be started, reached or stopped; the message says what to do."""


def run_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "run"


def log_path(state_dir: Path, name: str) -> Path:
    return Path(state_dir) / "logs" / f"{name}.log"


def _pid_file(state_dir: Path, name: str) -> Path:
    return run_dir(state_dir) / f"{name}.pid"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return None


def running_pid(state_dir: Path, name: str) -> int | None:
    """The pid of our process `name` if it is alive, else None (a stale pid file is removed)."""
    path = _pid_file(state_dir, name)
    try:
        pid_text, started = path.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if _start_time(pid) == started:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            return pid
    path.unlink(missing_ok=True)
    return None


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
        raise StackError(f"{host}:{port} is already taken by a process flead did not start; "
                         f"stop it or choose another port with {setting}")


def log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    try:
        return "\n".join(log_path(state_dir, name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start(state_dir: Path, name: str, cmd: Sequence[str], env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> int:
    """Start `cmd` detached (own session), output appended to logs/<name>.log; returns its pid."""
    log = log_path(state_dir, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    run_dir(state_dir).mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
    started = None
    for _ in range(50):  # /proc entry appears at once; retry briefly for safety
        started = _start_time(proc.pid)
        if started:
            break
        time.sleep(0.01)
    _pid_file(state_dir, name).write_text(f"{proc.pid} {started}\n")
    return proc.pid


def wait_until(check: Callable[[], bool], what: str, timeout: float, state_dir: Path, name: str) -> None:
    """Poll `check` until it is true; fail early with the log's tail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if running_pid(state_dir, name) is None:
            raise StackError(f"{name} exited while starting ({what}); last lines of "
                             f"{log_path(state_dir, name)}:\n{log_tail(state_dir, name)}")
        time.sleep(0.25)
    raise StackError(f"{name}: {what} not reached after {timeout:.0f} s; see {log_path(state_dir, name)}:\n"
                     f"{log_tail(state_dir, name)}")


def stop(state_dir: Path, name: str, grace: float = 20.0) -> bool:
    """Stop our process `name` (SIGTERM to its process group, then SIGKILL); True if one was running."""
    pid = running_pid(state_dir, name)
    if pid is None:
        return False
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and running_pid(state_dir, name) is not None:
            time.sleep(0.1)
        if running_pid(state_dir, name) is None:
            break
    _reap(pid)
    _pid_file(state_dir, name).unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (avoids zombies in long-lived callers)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
